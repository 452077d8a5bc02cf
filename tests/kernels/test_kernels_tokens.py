"""Random token masking of masked image modelling (kernels/tokens.py) and its place in the device stage
(mixmask/mixing/stage.py TokenMasking -> batch.keep).

The kept set is checked against the priorities drawn here from the Random123 reference generator
(kernels/rng.py uniform4_reference): sample j keeps the K patches of lowest u_l, u_l = the (l % 4)-th
word of uniform4(seed, epoch, batch_index, j, STREAMS["tokens"] * 2**24 + l // 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import tokens as kt
from kernels.rng import STREAMS, uniform4_reference
from kernels.tokens import keep_tokens, keep_tokens_reference, kept_count

KEYS = [(0, 0, 0), (3, 1, 7), (2 ** 64 - 1, 2 ** 32 - 1, 5), (12345, 9, 2 ** 31 - 1)]  # (seed, epoch, batch_index)
SHAPES = [(16, 4), (16, 12), (64, 16), (49, 12), (5, 1), (7, 7), (3, 2)]  # (L, K)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(backend: str, n, L, K, seed, epoch, batch_index) -> np.ndarray:
    if backend == "njit":
        return keep_tokens(n, L, K, seed, epoch, batch_index)
    out = np.empty((n, K), np.int64)
    kt._keep_tokens.py_func(n, L, K, np.uint64(seed), epoch, batch_index, out)
    return out


def priorities(L: int, seed: int, epoch: int, batch_index: int, j: int) -> np.ndarray:
    """u_l for l < L of sample j, from the reference generator (the layout of the module docstring)."""
    base = STREAMS["tokens"] * 2 ** 24
    return np.array([uniform4_reference(seed, epoch, batch_index, j, base + l // 4)[l % 4] for l in range(L)])


# ----------------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,K", SHAPES)
@pytest.mark.parametrize("key", KEYS)
def test_matches_reference_and_lowest_priorities(L, K, key, backend):
    n = 5
    got = run(backend, n, L, K, *key)
    assert got.dtype == np.int64 and got.shape == (n, K)
    np.testing.assert_array_equal(got, keep_tokens_reference(n, L, K, *key))
    for j in range(n):
        row = got[j]
        assert (np.diff(row) > 0).all(), row  # ascending, hence distinct
        assert row.min() >= 0 and row.max() < L
        u = priorities(L, *key, j)
        dropped = np.setdiff1d(np.arange(L), row)
        assert len(dropped) == L - K
        if len(dropped):  # every kept priority is below every dropped one
            assert u[row].max() < u[dropped].min(), (j, u, row)
        else:
            np.testing.assert_array_equal(row, np.arange(L))


def test_deterministic_and_keyed():
    n, L, K = 16, 64, 16
    a = keep_tokens(n, L, K, 1, 2, 3)
    np.testing.assert_array_equal(a, keep_tokens(n, L, K, 1, 2, 3))
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]:  # seed, epoch, batch_index
        assert not np.array_equal(a, keep_tokens(n, L, K, *other)), other
    assert len({r.tobytes() for r in a}) == n  # the samples of one call differ too
    # sample j depends only on its own keys: the first rows of a bigger call are the same
    np.testing.assert_array_equal(a[:4], keep_tokens(4, L, K, 1, 2, 3))
    # the kept set of a smaller K is a subset of a larger K's (the same priorities)
    small = keep_tokens(n, L, 4, 1, 2, 3)
    for s, b in zip(small, a):
        assert set(s) <= set(b)


@pytest.mark.parametrize("L,r", [(16, 0.75), (64, 0.75), (196, 0.75), (49, 0.5), (10, 0.7), (100, 0.9), (8, 0.99),
                                 (4, 0.999), (16, 0.0), (64, 0.6)])
def test_kept_count_is_maes_len_keep(L, r):
    expect = max(1, int(L * (1 - r)))  # MAE's len_keep, never 0
    assert kept_count(L, r) == expect and isinstance(kept_count(L, r), int)
    assert 1 <= kept_count(L, r) <= L


def test_every_patch_is_kept_equally_often():
    n, L, K = 4000, 16, 4
    keep = keep_tokens(n, L, K, 7, 0, 0)
    counts = np.bincount(keep.ravel(), minlength=L)
    assert counts.sum() == n * K
    p = K / L
    expected, sd = n * p, np.sqrt(n * p * (1 - p))  # each patch: Binomial(n, K/L)
    assert np.abs(counts - expected).max() < 5 * sd, counts
    chi2 = ((counts - expected) ** 2 / expected).sum()  # about (L - 1)(1 - p) for a fair sampler
    assert chi2 < 60, (chi2, counts)  # 15 dof: p < 1e-6 even for the plain chi-square
    # pairs of patches: the joint inclusion frequency of two patches is K(K-1)/(L(L-1)), not a block pattern
    member = np.zeros((n, L), bool)
    member[np.arange(n)[:, None], keep] = True
    both = member.T.astype(np.float64) @ member.astype(np.float64) / n
    off = both[~np.eye(L, dtype=bool)]
    assert np.abs(off - K * (K - 1) / (L * (L - 1))).max() < 0.03


@pytest.mark.parametrize("L,K", [(16, 0), (16, 17), (16, -1), (1, 2)])
def test_rejects_k_out_of_range(L, K):
    with pytest.raises(ValueError, match="K"):
        keep_tokens(2, L, K, 0, 0, 0)


# ----------------------------------------------------------------------------------------------------
# the device stage: batch.keep
# ----------------------------------------------------------------------------------------------------

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def views(n: int = 6, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v1 = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    v2 = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return v1, v2, torch.arange(n), torch.arange(n)


def stage(**kw):
    from mixmask.mixing.stage import MixStage, TokenMasking

    return MixStage(MEAN, STD, tokens=TokenMasking(4, 0.75), **kw)


def test_stage_adds_keep_keyed_like_the_masks():
    from mixmask.mixing.stage import MixStage, TokenMasking

    tm = TokenMasking(4, 0.75)
    assert tm.kept == 4
    v = views()
    st = stage(seed=5)
    a, b = st(*v, epoch=2, step=3), st(*v, epoch=2, step=3)
    assert a.keep is not None and a.keep.dtype == torch.int64 and a.keep.shape == (6, 4)
    assert a.keep.device == v[0].device
    assert torch.equal(a.keep, b.keep)
    # batch_index = step * world + rank (world 1): the reference sampler with the stage's keys
    np.testing.assert_array_equal(a.keep.numpy(), keep_tokens_reference(6, 16, 4, 5, 2, 3))
    assert (a.keep[:, 1:] > a.keep[:, :-1]).all()
    # another step, epoch or seed draws other tokens
    assert not torch.equal(a.keep, st(*v, epoch=2, step=4).keep)
    assert not torch.equal(a.keep, st(*v, epoch=3, step=3).keep)
    assert not torch.equal(a.keep, stage(seed=6)(*v, epoch=2, step=3).keep)
    # the views are what the stage makes without token masking
    plain = MixStage(MEAN, STD, seed=5)(*v, epoch=2, step=3)
    assert plain.keep is None
    assert torch.equal(a.x1, plain.x1) and torch.equal(a.x2, plain.x2)


def test_stage_keys_by_rank_and_world():
    v = views()
    r0 = stage(rank=0, world=2)(*v, epoch=1, step=5).keep
    r1 = stage(rank=1, world=2)(*v, epoch=1, step=5).keep
    assert not torch.equal(r0, r1)  # two processes of one step draw different tokens
    np.testing.assert_array_equal(r0.numpy(), keep_tokens_reference(6, 16, 4, 0, 1, 10))
    np.testing.assert_array_equal(r1.numpy(), keep_tokens_reference(6, 16, 4, 0, 1, 11))
    # batch_index 11 = step 11 of one process
    assert torch.equal(r1, stage()(*v, epoch=1, step=11).keep)


@pytest.mark.gpu
def test_stage_keep_on_the_views_device():
    v = [t.cuda() for t in views()]
    batch = stage()(*v, epoch=0, step=0)
    assert batch.keep.device == v[0].device and batch.keep.dtype == torch.int64
    assert torch.equal(batch.keep.cpu(), stage()(*views(), epoch=0, step=0).keep)
