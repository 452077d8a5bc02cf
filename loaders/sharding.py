"""Per-epoch shuffling and sharding by rank, shared by every backend.

Training (drop_last): the epoch's permutation (seeded by seed and epoch) is cut to a multiple of
world x batch, then rank r takes every world-th index from r. Every rank gets the same number of full
batches and every sample appears at most once per epoch across ranks; the < world x batch samples
cut are a different random subset each epoch. Evaluation (no drop_last): the order is kept and the
list is padded by repeating its start so ranks get equal counts; callers drop the repeats by index.

Label subsets (supervised fine-tuning on a fraction of the labels): a training loader given positions
``indices`` of its split draws ``indices[shard_indices(len(indices), ...)]`` each epoch, so the samples
it reports are still positions in the split's folder index (``draw_from`` checks them once, up front).
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
        check_fills(n, world, batch)
        order = order[: (n // (world * batch)) * world * batch]
    else:
        order = np.resize(order, -(-n // world) * world)  # pad by repeating the start (cyclically if world > n)
    return order[rank::world]


def batches_per_epoch(n: int, world: int, batch: int) -> int:
    """Full training batches each rank gets per epoch (drop_last)."""
    return n // (world * batch)


def check_fills(n: int, world: int, batch: int) -> None:
    """ValueError unless n samples fill one training batch on each of `world` processes."""
    if n // (world * batch) == 0:
        raise ValueError(
            f"{n} samples cannot fill one batch of {batch} on each of {world} processes; lower data.batch_size"
        )


def as_positions(indices) -> np.ndarray:
    """indices as distinct int64 positions (ValueError for anything else).  -> (m,) int64"""
    a = np.asarray(indices)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"indices must be a 1-D integer array, got shape {a.shape} of {a.dtype}")
    a = a.astype(np.int64)
    if len(np.unique(a)) != len(a):
        raise ValueError("indices must be distinct (a sample at most once per epoch)")
    return a


def draw_from(indices, n: int, world: int, batch: int) -> np.ndarray:
    """The positions (in a split of n samples) a training loader draws from: indices, or all n when None.
    Checked at construction: distinct, in [0, n), and enough for one batch on each of `world` processes
    (shard_indices' ValueError, raised now rather than mid-iteration).  -> (m,) int64"""
    idx = np.arange(n, dtype=np.int64) if indices is None else as_positions(indices)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}) (the split's folder index), got [{idx.min()}, {idx.max()}]")
    check_fills(len(idx), world, batch)
    return idx
