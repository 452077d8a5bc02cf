"""Sharding by rank (loaders/sharding.py): exactness, equal counts, per-epoch order, label subsets."""

import numpy as np
import pytest

from loaders.sharding import batches_per_epoch, draw_from, shard_indices


@pytest.mark.parametrize("n,world,batch", [(96, 2, 16), (100, 2, 16), (1000, 3, 32), (64, 1, 8)])
def test_train_shards_disjoint_equal_and_complete_when_divisible(n, world, batch):
    shards = [shard_indices(n, r, world, batch, seed=1, epoch=3, shuffle=True, drop_last=True) for r in range(world)]
    sizes = {len(s) for s in shards}
    assert sizes == {batches_per_epoch(n, world, batch) * batch}  # equal full batches on every rank
    allidx = np.concatenate(shards)
    assert len(np.unique(allidx)) == len(allidx)  # each sample at most once across ranks
    assert n - len(allidx) < world * batch  # only the remainder is cut
    if n % (world * batch) == 0:
        assert sorted(allidx.tolist()) == list(range(n))  # exactly once


def test_epochs_reshuffle_and_cut_different_samples():
    a = shard_indices(100, 0, 2, 16, seed=0, epoch=0, shuffle=True, drop_last=True)
    b = shard_indices(100, 0, 2, 16, seed=0, epoch=1, shuffle=True, drop_last=True)
    assert not np.array_equal(a, b)
    seen = set()
    for epoch in range(20):
        for r in range(2):
            seen |= set(shard_indices(100, r, 2, 16, seed=0, epoch=epoch, shuffle=True, drop_last=True).tolist())
    assert seen == set(range(100))  # the cut remainder rotates


def test_same_seed_same_order():
    a = shard_indices(50, 1, 2, 4, seed=7, epoch=2, shuffle=True, drop_last=True)
    assert np.array_equal(a, shard_indices(50, 1, 2, 4, seed=7, epoch=2, shuffle=True, drop_last=True))


def test_eval_shards_pad_to_equal_counts_and_cover_everything():
    shards = [shard_indices(11, r, 3, 4, seed=0, epoch=0, shuffle=False, drop_last=False) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set(np.concatenate(shards).tolist()) == set(range(11))
    shards = [shard_indices(2, r, 3, 4, seed=0, epoch=0, shuffle=False, drop_last=False) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0], [1], [0]]  # more ranks than samples: padded cyclically


def test_too_small_for_one_batch():
    with pytest.raises(ValueError, match="batch_size"):
        shard_indices(10, 0, 2, 8, seed=0, epoch=0, shuffle=True, drop_last=True)


def test_draw_from_checks_a_subset_up_front():
    assert draw_from(None, 5, 1, 2).tolist() == list(range(5))
    assert draw_from(np.array([4, 0, 2]), 5, 1, 2).tolist() == [4, 0, 2]  # the order given is kept
    for bad, match in (([1, 1, 2], "distinct"), ([0, 5], r"\[0, 5\)"), ([[0, 1]], "1-D"), ([0.0, 1.0], "integer"),
                       ([0, 1, 2], "batch_size")):
        with pytest.raises(ValueError, match=match):
            draw_from(bad, 5, 2, 2)
