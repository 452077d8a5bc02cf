"""Per-epoch shuffling and sharding by rank, shared by every backend.

Training (drop_last): the epoch's permutation (seeded by seed and epoch) is cut to a multiple of
world x batch, then rank r takes every world-th index from r. Every rank gets the same number of full
batches and every sample appears at most once per epoch across ranks; the < world x batch samples
cut are a different random subset each epoch. Evaluation (no drop_last): the order is kept and the
list is padded by repeating its start so ranks get equal counts; callers drop the repeats by index.
"""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's sample order.  -> (n,) int64"""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n).astype(np.int64)


def shard_indices(
    n: int, rank: int, world: int, batch: int, seed: int, epoch: int, shuffle: bool, drop_last: bool
) -> np.ndarray:
    """Indices of ``rank`` for ``epoch``.  -> (batches_per_rank * batch,) when drop_last."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    order = epoch_order(n, seed, epoch, shuffle)
    if drop_last:
        usable = (n // (world * batch)) * world * batch
        if usable == 0:
            raise ValueError(
                f"{n} samples cannot fill one batch of {batch} on each of {world} processes; "
                "lower data.batch_size"
            )
        order = order[:usable]
    else:
        per_rank = -(-n // world)
        pad = per_rank * world - n
        order = np.concatenate([order, order[:pad]])
    return order[rank::world]


def batches_per_epoch(n: int, world: int, batch: int) -> int:
    """Full training batches each rank gets per epoch (drop_last)."""
    return n // (world * batch)
