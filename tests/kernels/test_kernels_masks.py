"""MixMask grid masks (kernels/masks.py): agreement with the numpy reference, properties, lam."""
import math

import numpy as np
import pytest

from kernels import masks as km
from kernels import realised_lam, sample_masks

GRID = [(kind, g, r) for kind in ("block", "discrete") for g in (2, 3, 4, 7, 8, 14)
        for r in (0.01, 0.3, 0.5, 0.9)]


def _sample(backend, kind, n, g, ratio, seed, epoch, batch_index):
    if backend == "njit":
        return sample_masks(kind, n, g, ratio, seed, epoch, batch_index)
    out = np.empty((n, g, g), np.uint8)
    fn = km._block_masks if kind == "block" else km._discrete_masks
    fn.py_func(out, float(ratio), np.uint64(seed), epoch, batch_index)
    return out


@pytest.mark.parametrize("kind,g,ratio", GRID)
def test_matches_reference(kind, g, ratio, backend):
    got = _sample(backend, kind, 12, g, ratio, 3, 1, 7)
    want = km.sample_masks_reference(kind, 12, g, ratio, 3, 1, 7)
    assert got.dtype == np.uint8 and got.shape == (12, g, g)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["block", "discrete"])
def test_deterministic_and_keyed(kind):
    a = sample_masks(kind, 16, 8, 0.5, 1, 2, 3)
    np.testing.assert_array_equal(a, sample_masks(kind, 16, 8, 0.5, 1, 2, 3))
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]:
        assert not np.array_equal(a, sample_masks(kind, 16, 8, 0.5, *other)), other
    assert len({m.tobytes() for m in a}) > 8  # samples of one call differ too
    # sample s depends only on its own keys: the first rows of a bigger call are the same
    np.testing.assert_array_equal(a[:4], sample_masks(kind, 4, 8, 0.5, 1, 2, 3))
    big = sample_masks(kind, 3, 8, 0.5, 2 ** 64 - 1, 2 ** 32 - 1, 0)  # full key range, after small keys
    np.testing.assert_array_equal(big, km.sample_masks_reference(kind, 3, 8, 0.5, 2 ** 64 - 1, 2 ** 32 - 1, 0))


@pytest.mark.parametrize("g", [2, 3, 8])
@pytest.mark.parametrize("ratio", [1e-9, 0.001, 0.05, 0.5, 0.95, 0.999, 1 - 1e-9])
def test_discrete_never_constant(g, ratio, backend):
    m = _sample(backend, "discrete", 64, g, ratio, 0, 0, 0).reshape(64, -1)
    ones = m.sum(1)
    assert ((ones > 0) & (ones < g * g)).all()
    assert set(np.unique(m)) <= {0, 1}


def test_discrete_masked_fraction():
    m = sample_masks("discrete", 4000, 8, 0.3, 5, 0, 0)
    assert abs((1 - m.mean()) - 0.3) < 0.01


@pytest.mark.parametrize("bad", [dict(g=1), dict(ratio=0.0), dict(ratio=1.0), dict(ratio=-0.1)])
def test_discrete_rejects_impossible(bad):
    args = dict(kind="discrete", n=2, g=4, ratio=0.5, seed=0, epoch=0, batch_index=0) | bad
    with pytest.raises(ValueError):
        sample_masks(**args)


def test_rejects_bad_kind_and_keys():
    with pytest.raises(ValueError):
        sample_masks("grid", 1, 8, 0.5, 0, 0, 0)
    with pytest.raises(ValueError):
        sample_masks("block", 1, 8, 0.5, -1, 0, 0)


def test_block_typical_statistics():
    g, r = 8, 0.5
    m = sample_masks("block", 1000, g, r, 11, 0, 0)
    masked = (m == 0).reshape(1000, -1).sum(1)
    target = int(r * g * g)
    assert (masked <= target).all()
    assert (masked > 0).all()
    assert 0.40 < masked.mean() / (g * g) <= 0.5  # BEiT fills close to the target at g=8
    # BEiT's generator only stops early when no rectangle fits: at g=8, r=0.5 nearly always exactly full
    assert (masked == target).mean() > 0.8
    # masked cells form rectangles of at least a few cells, unlike i.i.d. cells:
    # most masked cells have a masked 4-neighbour
    mm = (m == 0)
    nb = np.zeros_like(mm)
    nb[:, 1:] |= mm[:, :-1]
    nb[:, :-1] |= mm[:, 1:]
    nb[:, :, 1:] |= mm[:, :, :-1]
    nb[:, :, :-1] |= mm[:, :, 1:]
    assert (mm & nb).sum() / mm.sum() > 0.95


@pytest.mark.parametrize("g", [1, 2, 3, 4])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_block_terminates_on_small_grids(g, ratio, backend):
    m = _sample(backend, "block", 32, g, ratio, 0, 0, 0)
    masked = (m == 0).reshape(32, -1).sum(1)
    assert (masked <= int(ratio * g * g)).all()
    if (g, ratio) == (4, 0.5):  # rectangles of >= 4 cells fit in 3x3: something is masked
        assert (masked > 0).all()
    if g <= 1 or ratio == 0.0:  # h, w < g is impossible / nothing to mask: all kept
        assert (masked == 0).all()


# --- realised lam ----------------------------------------------------------------------------

def _lam_brute(masks, H, W):
    """Materialise the full H x W mask by explicit index arithmetic and take its mean."""
    M, gh, gw = masks.shape
    full = np.empty((M, H, W), np.float64)
    for y in range(H):
        for x in range(W):
            full[:, y, x] = masks[:, (y * gh) // H, (x * gw) // W]
    return full.mean(axis=(1, 2))


@pytest.mark.parametrize("H,W,g", [(224, 224, 8), (32, 32, 4), (7, 5, 3), (9, 12, 5), (3, 4, 8), (1, 1, 2)])
def test_realised_lam_brute_force(H, W, g):
    m = sample_masks("discrete", 9, g, 0.4, 1, 0, 0)
    lam = realised_lam(m, H, W)
    assert lam.dtype == np.float32 and lam.shape == (9,)
    np.testing.assert_allclose(lam, _lam_brute(m, H, W), rtol=0, atol=1e-7)


def test_realised_lam_repeat_when_cells_divide():
    m = sample_masks("block", 5, 8, 0.5, 2, 0, 0)
    up = np.repeat(np.repeat(m, 28, axis=1), 28, axis=2)  # (5, 224, 224)
    np.testing.assert_allclose(realised_lam(m, 224, 224), up.mean(axis=(1, 2)), atol=1e-7)


def test_realised_lam_limits_and_nonsquare_grid():
    ones = np.ones((2, 4, 4), np.uint8)
    assert (realised_lam(ones, 10, 7) == 1).all()
    assert (realised_lam(0 * ones, 10, 7) == 0).all()
    m = np.array([[[1, 0, 0]]], np.uint8)  # (1, 1, 3): cols of width 2, 2, 1 at W=5 -> 2/5
    assert math.isclose(float(realised_lam(m, 4, 5)[0]), 2 / 5, rel_tol=1e-7)
