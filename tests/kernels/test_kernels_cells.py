"""Cell masks of erase-based and saliency-guided masking (kernels/cells.py): njit and plain Python against
the numpy reference; the counts of each mode recomputed from the Philox draws; focal windows;
foreground cells; per-sample independence, keying and argument checks."""
import math

import numpy as np
import pytest

from kernels import cells as kc
from kernels.rng import STREAM_SHIFT, uniform4_reference

BASE = dict(N=12, C=3, g=5, r_lo=0.2, r_hi=0.8, spatial_p=0.5, focal_p=0.0, focal_size=0.5, cap=1.0,
            mode="uniform", H=20, W=30, seed=7, epoch=1, batch_index=2, stream=3)


def call(backend="njit", fg=None, **over):
    a = dict(BASE) | over
    if backend == "njit":
        return kc.cell_masks(fg, **a)
    # the same kernel as plain Python, with the arguments the public wrapper prepares
    kc._check(fg, a["N"], a["C"], a["g"], a["r_lo"], a["r_hi"], a["spatial_p"], a["focal_p"], a["focal_size"],
              a["cap"], a["mode"], a["H"], a["W"])
    masks = np.empty((a["N"], a["C"], a["g"], a["g"]), np.uint8)
    boxes = np.empty((a["N"], 4), np.int64)
    fgc = np.zeros((a["N"], a["g"] ** 2), np.uint8) if fg is None else np.ascontiguousarray(fg, np.uint8)
    kc._cell_masks.py_func(fgc, masks, boxes, float(a["r_lo"]), float(a["r_hi"]), float(a["spatial_p"]),
                           float(a["focal_p"]), float(a["focal_size"]), float(a["cap"]), kc.MODES[a["mode"]],
                           int(a["H"]), int(a["W"]), np.uint64(a["seed"]), np.int64(a["epoch"]),
                           np.int64(a["batch_index"]), np.int64(a["stream"]))
    return masks, boxes


def reference(fg=None, **over):
    a = dict(BASE) | over
    return kc.cell_masks_reference(fg, *(a[k] for k in ("N", "C", "g", "r_lo", "r_hi", "spatial_p", "focal_p",
                                                         "focal_size", "cap", "mode", "H", "W", "seed", "epoch",
                                                         "batch_index", "stream")))


def draw0(j, **over):
    """(focal?, spatial?, r) of sample j, recomputed from Philox call 0 of its stream."""
    a = dict(BASE) | over
    u0, u1, u2, _ = uniform4_reference(a["seed"], a["epoch"], a["batch_index"], j, (a["stream"] << STREAM_SHIFT) + 0)
    return u0 < a["focal_p"], u1 < a["spatial_p"], a["r_lo"] + (a["r_hi"] - a["r_lo"]) * u2


def random_fg(N, G, seed, lo=0.15, hi=0.85):
    """(N, G) uint8 foreground maps of different densities; sample 0 all background, sample 1 all foreground."""
    rng = np.random.default_rng(seed)
    fg = (rng.random((N, G)) < rng.uniform(lo, hi, (N, 1))).astype(np.uint8)
    fg[0] = 0
    fg[1] = 1
    return fg


KEYS = [dict(seed=7, epoch=1, batch_index=2, stream=3), dict(seed=2 ** 64 - 1, epoch=2 ** 32 - 1, batch_index=9, stream=4)]


@pytest.mark.parametrize("keys", KEYS, ids=["small_keys", "big_keys"])
@pytest.mark.parametrize("spatial_p", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("focal_p", [0.0, 0.4])
@pytest.mark.parametrize("mode", ["uniform", "balanced", "foreground"])
def test_matches_reference(mode, focal_p, spatial_p, keys, backend):
    N, g = 10, 5
    fg = random_fg(N, g * g, seed=keys["batch_index"])
    over = dict(N=N, g=g, mode=mode, focal_p=focal_p, spatial_p=spatial_p, cap=0.3, **keys)
    masks, boxes = call(backend, fg, **over)
    want_m, want_b = reference(fg, **over)
    assert masks.dtype == np.uint8 and masks.shape == (N, 3, g, g)
    assert boxes.dtype == np.int64 and boxes.shape == (N, 4)
    np.testing.assert_array_equal(masks, want_m)
    np.testing.assert_array_equal(boxes, want_b)
    assert set(np.unique(masks)) <= {0, 1}
    assert (masks == 0).any()  # not vacuous (at least one sample is not focal and erases something)


def test_uniform_mode_counts_and_spatial_planes():
    N, C, g = 40, 3, 6
    G = g * g
    masks, boxes = call(N=N, C=C, g=g, spatial_p=0.5, focal_p=0.0)
    assert (boxes == 0).all()
    kinds = []
    for j in range(N):
        focal, spatial, r = draw0(j, spatial_p=0.5)
        assert not focal
        erased = (masks[j] == 0).reshape(C, G).sum(1)
        assert (erased == int(r * G)).all(), (j, erased, r)
        same = all(np.array_equal(masks[j, 0], masks[j, c]) for c in range(C))
        assert same == spatial, j  # channel-wise planes are independent draws (r >= 0.2: >= 7 of 36 cells)
        kinds.append(spatial)
    assert 0 < sum(kinds) < N  # both kinds occur at spatial_p = 0.5
    for p, want in ((0.0, False), (1.0, True)):
        m, _ = call(N=N, C=C, g=g, spatial_p=p)
        assert all(all(np.array_equal(m[j, 0], m[j, c]) for c in range(C)) == want for j in range(N))


def test_uniform_mode_cells_uniformly_chosen():
    """Every cell is erased with probability r: counts per cell ~ Binomial(N, 1/2), 5 sigma."""
    N, g = 600, 4
    masks, _ = call(N=N, C=1, g=g, r_lo=0.5, r_hi=0.5, spatial_p=1.0)
    per_cell = (masks[:, 0] == 0).sum(0)
    assert (np.abs(per_cell - N / 2) < 5 * math.sqrt(N / 4)).all(), per_cell
    assert len({m.tobytes() for m in masks}) > N * 0.9  # C(16, 8) = 12870 patterns


@pytest.mark.parametrize("C,spatial_p", [(1, 1.0), (3, 0.0), (3, 0.5)])
def test_balanced_mode_equal_fractions(C, spatial_p):
    N, g = 40, 8
    G = g * g
    fg = random_fg(N, G, seed=C)
    over = dict(N=N, C=C, g=g, r_lo=0.1, r_hi=0.9, spatial_p=spatial_p, mode="balanced", cap=1.0)
    masks, _ = call(fg=fg, **over)
    for j in range(N):
        _, _, r = draw0(j, **over)
        n, nf = int(r * G), int(fg[j].sum())
        is_fg = fg[j].astype(bool)
        for c in range(C):
            erased = masks[j, c].ravel() == 0
            n_fg, n_bg = int((erased & is_fg).sum()), int((erased & ~is_fg).sum())
            assert n_fg + n_bg == n, (j, c)
            assert abs(n_fg - n * nf / G) <= 0.5 and abs(n_bg - n * (G - nf) / G) <= 0.5, (j, c, n_fg, n_bg)
            if 0 < nf < G:  # the masked fractions agree within one cell of either group
                assert abs(n_fg / nf - n_bg / (G - nf)) <= 0.5 / nf + 0.5 / (G - nf) + 1e-12  # ties reach it


def test_balanced_mode_cap_binds():
    N, g, cap = 20, 8, 0.1
    G = g * g
    rng = np.random.default_rng(3)
    fg = np.zeros((N, G), np.uint8)
    for j in range(N):
        fg[j, rng.permutation(G)[:40]] = 1  # nf = 40
    over = dict(N=N, C=1, g=g, r_lo=0.5, r_hi=0.6, spatial_p=1.0, mode="balanced", cap=cap)
    masks, _ = call(fg=fg, **over)
    cap_cells = round(cap * G)
    assert cap_cells == 6
    for j in range(N):
        _, _, r = draw0(j, **over)
        n = int(r * G)
        assert n * 40 / G > cap_cells + 1  # the cap binds
        erased = masks[j, 0].ravel() == 0
        n_fg, n_bg = int((erased & (fg[j] == 1)).sum()), int((erased & (fg[j] == 0)).sum())
        assert n_fg == cap_cells
        assert n_bg == min(n - cap_cells, G - 40)


def test_foreground_mode_erases_only_foreground():
    N, C, g = 30, 3, 6
    G = g * g
    fg = random_fg(N, G, seed=5)
    over = dict(N=N, C=C, g=g, r_lo=0.1, r_hi=0.9, spatial_p=0.5, mode="foreground")
    masks, _ = call(fg=fg, **over)
    for j in range(N):
        _, _, r = draw0(j, **over)
        nf = int(fg[j].sum())
        for c in range(C):
            erased = masks[j, c].ravel() == 0
            assert not (erased & (fg[j] == 0)).any()
            assert erased.sum() == math.floor(r * nf + 0.5) and abs(erased.sum() - r * nf) <= 0.5
    assert (masks[0] == 1).all()  # sample 0: no foreground, nothing erased
    assert (masks == 0).sum() > 0


@pytest.mark.parametrize("H,W,focal_size", [(20, 30, 0.5), (33, 17, 0.37), (16, 16, 1.0)])
def test_focal_windows(H, W, focal_size):
    N = 40
    over = dict(N=N, H=H, W=W, focal_size=focal_size, focal_p=0.5)
    masks, boxes = call(**over)
    h, w = math.floor(focal_size * H + 0.5), math.floor(focal_size * W + 0.5)
    a = dict(BASE) | over
    n_focal = 0
    for j in range(N):
        focal, _, _ = draw0(j, **over)
        if not focal:
            assert (boxes[j] == 0).all() and (masks[j] == 0).any()
            continue
        n_focal += 1
        top, left, bh, bw = boxes[j]
        assert (masks[j] == 1).all()  # a focal sample erases no cell
        assert (bh, bw) == (h, w) and h > 0 and w > 0
        assert 0 <= top <= H - h and 0 <= left <= W - w
        v = uniform4_reference(a["seed"], a["epoch"], a["batch_index"], j, (a["stream"] << STREAM_SHIFT) + 1)
        assert (top, left) == (min(int(v[0] * (H - h + 1)), H - h), min(int(v[1] * (W - w + 1)), W - w))
    assert 0 < n_focal < N
    _, all_focal = call(**(over | dict(focal_p=1.0)))
    assert (all_focal[:, 2] == h).all()
    if h < H:  # the windows move around
        assert len(set(all_focal[:, 0])) > 1


# --- foreground cells ---------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.6, 1.5])
def test_foreground_cells_formula(t):
    rng = np.random.default_rng(int(t * 10))
    A = rng.gamma(2.0, 1.0, (6, 49))
    got = kc.foreground_cells(A, t)
    assert got.dtype == np.uint8 and got.shape == A.shape
    for j in range(len(A)):
        row = [float(v) for v in A[j]]
        mean = sum(row) / len(row)
        sd = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))
        assert [int(v >= mean - t * sd) for v in row] == got[j].tolist()
    assert 0 < got.sum() < got.size


def test_foreground_cells_keep_their_positions():
    """Regression: the reference code thresholded a row-sorted copy of the map, so the foreground landed in
    the wrong columns (the last ones of each row). Here salient and dull cells sit in specific columns."""
    g = 4
    rng = np.random.default_rng(0)
    A = rng.uniform(0.0, 0.1, (2, g, g))
    A[0, :, [0, 2]] += 0.9          # sample 0: salient columns 0 and 2 (sorted rows would give 2 and 3)
    A[1] += 0.9                      # sample 1: salient but for three dull cells away from column 0
    A[1, 0, 3] = A[1, 2, 2] = A[1, 3, 1] = 0.05
    fg = kc.foreground_cells(A.reshape(2, -1), 0.6).reshape(2, g, g)
    want0 = np.zeros((g, g), np.uint8)
    want0[:, [0, 2]] = 1
    want1 = np.ones((g, g), np.uint8)
    want1[0, 3] = want1[2, 2] = want1[3, 1] = 0
    np.testing.assert_array_equal(fg[0], want0)
    np.testing.assert_array_equal(fg[1], want1)
    # the map's own layout matters, not its sorted values: a column permutation moves the foreground along
    perm = [3, 1, 0, 2]
    np.testing.assert_array_equal(kc.foreground_cells(A[:, :, perm].reshape(2, -1), 0.6).reshape(2, g, g),
                                  fg[:, :, perm])


def test_foreground_cells_rejects_bad_shape():
    with pytest.raises(ValueError):
        kc.foreground_cells(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError):
        kc.foreground_cells(np.zeros(16))


# --- independence, keys, arguments --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["uniform", "balanced", "foreground"])
def test_samples_differ_with_identical_foreground(mode, backend):
    """Regression: the reference code took every hard negative's cells from local sample 0."""
    N, g = 16, 6
    row = (np.random.default_rng(1).random(g * g) < 0.5).astype(np.uint8)
    fg = np.tile(row, (N, 1))
    masks, _ = call(backend, fg, N=N, C=1, g=g, r_lo=0.5, r_hi=0.5, spatial_p=1.0, mode=mode)
    assert (masks == 0).reshape(N, -1).sum(1).min() > 0
    assert len({m.tobytes() for m in masks}) == N


def test_deterministic_and_keyed():
    fg = random_fg(16, 36, seed=2)
    over = dict(N=16, g=6, mode="balanced", focal_p=0.2, cap=0.5)
    m, b = call(fg=fg, **over)
    m2, b2 = call(fg=fg, **over)
    np.testing.assert_array_equal(m, m2)
    np.testing.assert_array_equal(b, b2)
    for key in ("seed", "epoch", "batch_index", "stream"):
        other, _ = call(fg=fg, **(over | {key: BASE[key] + 1}))
        assert not np.array_equal(m, other), key
        assert sum(not np.array_equal(m[j], other[j]) for j in range(16)) > 8, key
    # sample j depends only on its own keys: the first samples of a bigger call are the same
    m4, b4 = call(fg=fg[:4], **(over | dict(N=4)))
    np.testing.assert_array_equal(m4, m[:4])
    np.testing.assert_array_equal(b4, b[:4])


@pytest.mark.parametrize("over", [
    dict(mode="random"), dict(mode="Uniform"),
    dict(r_lo=0.6, r_hi=0.4), dict(r_lo=-0.1), dict(r_hi=1.5),
    dict(spatial_p=1.5), dict(focal_p=-0.1), dict(cap=2.0), dict(focal_size=0.0), dict(focal_size=1.2),
    dict(g=0), dict(C=0), dict(H=0), dict(N=-1),
    dict(mode="balanced", fg=np.ones((12, 24), np.uint8)),    # fg shape: g*g = 25
    dict(mode="uniform", fg=np.ones((11, 25), np.uint8)),     # fg shape: N = 12
    dict(mode="foreground", fg=np.ones((12, 5, 5), np.uint8)),
    dict(mode="balanced", fg=None), dict(mode="foreground", fg=None),
])
def test_bad_arguments(over):
    over = dict(over)
    fg = over.pop("fg", None)
    with pytest.raises(ValueError):
        kc.cell_masks(fg, **(BASE | over))
    with pytest.raises(ValueError):
        reference(fg, **over)
