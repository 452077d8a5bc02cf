"""kernels/ccrop.py + kernels/views.py: ContrastiveCrop's keyed Beta(alpha, alpha) crop offsets (Peng et
al., CVPR 2022): the Beta draws against numpy's, the crop corner inside a box against Beta by a
two-sample KS test, alpha <= 0 exactly RandomResizedCrop, windows inside the image, centres inside
the box, compiled == plain Python, and run-time reads of a table through its address."""
import math

import numpy as np
import pytest
from numba import njit

from kernels.ccrop import (BETA_COUNTER, beta_pair, beta_pair_reference, ccrop_offset, ccrop_offset_reference,
                           offset_range)
from kernels.views import VIEW_KEY, crop_window_reference, draw_one, draw_view_params, read_boxes, read_int64

F = np.asarray
SCALE, RATIO = F([0.2, 1.0]), F([0.75, 4 / 3])
P, JIT, SIG = F([0.8, 0.2, 0.5, 0.1, 0.5]), F([0.4, 0.4, 0.4, 0.1]), F([0.1, 2.0])


def ks_2samp(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic D = max |F_a - F_b| (computed by hand: no scipy)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def ks_crit(n, m, level=0.001) -> float:
    """The asymptotic critical value of D at `level`: c(level) sqrt((n + m) / (n m))."""
    return math.sqrt(-0.5 * math.log(level / 2)) * math.sqrt((n + m) / (n * m))


def views(seed, epoch, view, idx, sizes, boxes, alpha, scale=SCALE, ratio=RATIO, fn=draw_view_params):
    n = len(idx)
    out = dict(roi=np.empty((n, 4), np.float32), flip=np.empty(n, np.int32), jitter_on=np.empty(n, np.int32),
               jitter=np.empty((n, 4), np.float32), gray=np.empty(n, np.int32), blur_on=np.empty(n, np.int32),
               sigma=np.empty(n, np.float32), solarize=np.empty(n, np.int32))
    fn(np.uint64(seed), epoch, view, F(idx, np.int64), F(sizes, np.int64).reshape(n, 2), F(scale, np.float64),
       F(ratio, np.float64), P, JIT, SIG, np.ascontiguousarray(boxes, np.float32).reshape(n, 4), float(alpha),
       *out.values())
    return out


def windows(seed, epoch, view, idx, sizes, boxes, alpha, **kw):
    """(N, 4) int64 (y0, x0, h, w) px from draw_one via draw_view_params' roi."""
    roi = views(seed, epoch, view, idx, sizes, boxes, alpha, **kw)["roi"].astype(np.float64)
    W, H = F(sizes, np.float64).T
    y0, x0 = np.rint(roi[:, 0] * H), np.rint(roi[:, 1] * W)
    return np.stack([y0, x0, np.rint(roi[:, 2] * H) - y0, np.rint(roi[:, 3] * W) - x0], 1).astype(np.int64)


def whole(n):
    return np.tile(np.float32([0, 0, 1, 1]), (n, 1))


@pytest.mark.parametrize("alpha", [0.1, 0.6, 1.0, 3.0])
def test_beta_draws_follow_beta(alpha):
    """b_y, b_x over 4000 keys against numpy's Beta(alpha, alpha) sampler (two-sample KS), their
    moments, and b_y independent of b_x."""
    n = 4000
    b = np.array([beta_pair(np.uint64(3), 1, VIEW_KEY, i, alpha) for i in range(n)])  # (n, 2)
    ref = np.random.default_rng(0).beta(alpha, alpha, size=n)
    for col in (0, 1):
        assert ks_2samp(b[:, col], ref) < ks_crit(n, n), (alpha, col)
        assert abs(b[:, col].mean() - 0.5) < 4 * math.sqrt(1 / (4 * (2 * alpha + 1)) / n)
        assert abs(b[:, col].var() / (1 / (4 * (2 * alpha + 1))) - 1) < 0.1
    assert abs(np.corrcoef(b[:, 0], b[:, 1])[0, 1]) < 4 / math.sqrt(n)
    assert ((b >= 0) & (b <= 1)).all()


def test_tiny_alpha_does_not_break():
    """alpha -> 0: Beta mass at 0 and 1, no NaN (log-space ratio)."""
    b = np.array([beta_pair(np.uint64(1), 0, 5, i, 0.01) for i in range(500)])
    assert np.isfinite(b).all() and ((b < 0.01) | (b > 0.99)).mean() > 0.9


def test_compiled_equals_plain_python_reference():
    rng = np.random.default_rng(1)
    for _ in range(300):
        seed, epoch, slot, i = int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 50)), \
            int(rng.integers(0, 2**31)), int(rng.integers(0, 10**7))
        alpha = float(rng.choice([0.05, 0.3, 0.6, 1.0, 2.5]))
        got = beta_pair(np.uint64(seed), epoch, slot, i, alpha)
        want = beta_pair_reference(seed, epoch, slot, i, alpha)
        assert np.allclose(got, want, rtol=1e-12, atol=0), (got, want)
        W, H = int(rng.integers(50, 3000)), int(rng.integers(50, 3000))
        w, h = int(rng.integers(1, W + 1)), int(rng.integers(1, H + 1))
        box = np.sort(rng.random((2, 2)).astype(np.float32), 0).reshape(4)  # (y0, x0, y1, x1), y0 <= y1
        assert ccrop_offset(np.uint64(seed), epoch, slot, i, W, H, w, h, box, alpha) == \
            ccrop_offset_reference(seed, epoch, slot, i, W, H, w, h, box, alpha)


def test_windows_equal_the_reference_and_py_func():
    rng = np.random.default_rng(2)
    n = 300
    idx = rng.integers(0, 10**6, n)
    sizes = np.stack([rng.integers(1, 900, n), rng.integers(1, 900, n)], 1)
    lo = rng.random((n, 2)) * 0.7
    boxes = np.concatenate([lo, lo + 0.05 + rng.random((n, 2)) * 0.25], 1).astype(np.float32)  # (n, 4) y0 x0 y1 x1
    a = views(2**64 - 1, 3, 1, idx, sizes, boxes, 0.6)
    b = views(2**64 - 1, 3, 1, idx, sizes, boxes, 0.6, fn=draw_view_params.py_func)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    got = windows(2**64 - 1, 3, 1, idx, sizes, boxes, 0.6)
    want = [crop_window_reference(2**64 - 1, 3, 1, int(i), int(W), int(H), SCALE, RATIO, box, 0.6)
            for i, (W, H), box in zip(idx, sizes, boxes)]
    np.testing.assert_array_equal(got, np.array(want))


def test_alpha_off_is_exactly_random_resized_crop():
    """alpha <= 0: the boxes are ignored and every output equals plain RandomResizedCrop's draw (the
    rule of torchvision's get_params on the keyed uniforms, reference in plain Python)."""
    rng = np.random.default_rng(3)
    n = 400
    idx = rng.integers(0, 10**6, n)
    sizes = np.stack([rng.integers(1, 1200, n), rng.integers(1, 1200, n)], 1)
    boxes = rng.random((n, 4)).astype(np.float32)  # arbitrary, even inverted: unused
    plain = views(9, 4, 0, idx, sizes, whole(n), 0.0)
    for alpha in (0.0, -0.5):
        other = views(9, 4, 0, idx, sizes, boxes, alpha)
        for k in plain:
            np.testing.assert_array_equal(plain[k], other[k], err_msg=k)
    want = [crop_window_reference(9, 4, 0, int(i), int(W), int(H), SCALE, RATIO) for i, (W, H) in zip(idx, sizes)]
    np.testing.assert_array_equal(windows(9, 4, 0, idx, sizes, whole(n), 0.0), np.array(want))


def test_ccrop_keeps_size_and_colour_draws():
    """ContrastiveCrop changes only the offsets: crop size, fallback and colour/flip draws are those of
    the alpha = 0 draw (counters 0-12; the Beta draws use counters >= BETA_COUNTER)."""
    assert BETA_COUNTER >= 13
    rng = np.random.default_rng(4)
    n = 500
    idx = rng.integers(0, 10**6, n)
    sizes = np.stack([rng.integers(1, 600, n), rng.integers(1, 600, n)], 1)
    boxes = np.tile(np.float32([0.1, 0.2, 0.4, 0.5]), (n, 1))
    a, b = views(5, 2, 1, idx, sizes, whole(n), 0.0), views(5, 2, 1, idx, sizes, boxes, 0.6)
    for k in a:
        if k != "roi":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    wa, wb = windows(5, 2, 1, idx, sizes, whole(n), 0.0), windows(5, 2, 1, idx, sizes, boxes, 0.6)
    np.testing.assert_array_equal(wa[:, 2:], wb[:, 2:])  # same (h, w)
    assert (wa[:, :2] != wb[:, :2]).any(1).mean() > 0.5


def test_crop_inside_image_and_centre_inside_box():
    rng = np.random.default_rng(5)
    n = 3000
    idx = np.arange(n)
    sizes = np.stack([rng.integers(1, 700, n), rng.integers(1, 700, n)], 1)
    lo = rng.random((n, 2))
    hi = np.minimum(lo + rng.random((n, 2)) * 0.5, 1)
    valid = np.concatenate([lo, hi], 1).astype(np.float32)  # (n, 4) y0 <= y1, x0 <= x1
    boxes = valid.copy()
    boxes[:50] = boxes[:50, [2, 3, 0, 1]]  # inverted boxes: still inside the image
    for alpha in (0.1, 0.6, 2.0):
        y0, x0, h, w = windows(1, 0, 0, idx, sizes, boxes, alpha, scale=(0.02, 1.0)).T
        W, H = sizes.T
        assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= H).all() and (x0 + w <= W).all()
        assert (h >= 1).all() and (w >= 1).all()
    # square images and scale <= 0.5: the first try always fits, so the centre follows the rule:
    # top + h // 2 in [int(H y0), int(H y1)], clamped to the centres a window inside the image can have
    sizes = np.tile(rng.integers(20, 700, (n, 1)), (1, 2))
    for alpha in (0.1, 0.6, 2.0):
        y0, x0, h, w = windows(1, 0, 0, idx, sizes, valid, alpha, scale=(0.02, 0.5)).T
        bx = valid.astype(np.float64)
        S = sizes[:, 0]
        for start, size, b0, b1 in ((y0, h, bx[:, 0], bx[:, 2]), (x0, w, bx[:, 1], bx[:, 3])):
            c = start + size // 2
            lo_c = np.clip((S * b0).astype(np.int64), size // 2, S - size + size // 2)
            hi_c = np.clip((S * b1).astype(np.int64), size // 2, S - size + size // 2)
            assert ((c >= lo_c) & (c <= hi_c)).all(), alpha


@pytest.mark.parametrize("alpha", [0.1, 0.6, 2.0])
def test_crop_corner_in_the_box_is_beta_distributed(alpha):
    """The corner's position in its range, (top - ch0) / (ch1 - ch0) = int(span b) / span, is that of
    b ~ Beta(alpha, alpha): two-sample KS test against numpy's sampler floored the same way (4000
    samples; ranges >= 400 px)."""
    n, W, H = 4000, 6000, 5000
    box = np.float32([0.2, 0.1, 0.8, 0.7])
    idx = np.arange(n) + 10**5
    y0, x0, h, w = windows(11, 2, 0, idx, np.tile([[W, H]], (n, 1)), np.tile(box, (n, 1)), alpha,
                           scale=(0.01, 0.02)).T
    ref = np.random.default_rng(1).beta(alpha, alpha, size=n)
    for start, size, N, lo, hi in ((y0, h, H, box[0], box[2]), (x0, w, W, box[1], box[3])):
        rng_ = np.array([offset_range(N, int(s), float(lo), float(hi)) for s in size])  # (n, 2) c0, c1
        span = rng_[:, 1] - rng_[:, 0]
        assert span.min() >= 400
        pos = (start - rng_[:, 0]) / span
        assert ((pos >= 0) & (pos <= 1)).all()
        assert ks_2samp(pos, np.floor(span * ref) / span) < ks_crit(n, n), alpha


def test_offset_range_clamps():
    assert offset_range(100, 80, 0.9, 1.0) == (20, 20)  # box at the bottom, big crop: flush with the edge
    assert offset_range(100, 80, 0.0, 0.1) == (0, 0)  # box at the top
    assert offset_range(100, 10, 0.0, 1.0) == (0, 90)  # whole image: every offset
    assert offset_range(100, 10, 0.5, 0.2) == (45, 45)  # inverted box: a single offset, inside the image
    assert offset_range(100, 100, 0.3, 0.6) == (0, 0)


def test_read_boxes_sees_in_place_updates():
    """Compiled code holding only the table's address reads the rows written after compilation (the
    FFCV decoder's route)."""
    table = np.zeros((5, 4), np.float32)
    pos = np.arange(5, dtype=np.int64)[::-1].copy()
    addr, paddr = table.ctypes.data, pos.ctypes.data

    @njit
    def row_sum(k):
        t = read_boxes(addr, 5)
        p = read_int64(paddr, 5)
        return t[p[k]].sum()

    assert row_sum(0) == 0
    table[4] = [0.1, 0.2, 0.3, 0.4]
    assert abs(row_sum(0) - 1.0) < 1e-6
    table[:] = 1
    assert row_sum(3) == 4


def test_draw_one_from_python_matches_the_batch_kernel():
    """The torchvision backend calls draw_one per sample; the DALI feeder the batched kernel."""
    box = np.float32([0.3, 0.3, 0.6, 0.9])
    got = draw_one(np.uint64(7), 3, 1, 1234, 640, 480, SCALE, RATIO, P, JIT, SIG, box, 0.6)[:4]
    want = windows(7, 3, 1, [1234], [[640, 480]], box[None], 0.6)[0]
    assert tuple(int(v) for v in got) == tuple(want)


SCRIPT = r'''
import numba, numpy as np
assert numba.config.DISABLE_JIT
from kernels import ccrop, views
U = np.uint64
for i in range(50):
    for a in (0.1, 0.6, 2.0):
        assert ccrop.beta_pair(U(2**63 + 5), 1, 2, i, a) == ccrop.beta_pair_reference(2**63 + 5, 1, 2, i, a)
box = np.float32([0.2, 0.3, 0.5, 0.9])
f = np.asarray
for i in range(50):
    got = views.draw_one(U(3), 2, 0, i, 300, 200, f([0.2, 1.0]), f([0.75, 4 / 3]), f([0.8, 0.2, 0.5, 0.1, 0.5]),
                         f([0.4, 0.4, 0.4, 0.1]), f([0.1, 2.0]), box, 0.6)[:4]
    assert got == views.crop_window_reference(3, 2, 0, i, 300, 200, (0.2, 1.0), (0.75, 4 / 3), box, 0.6), i
print("OK")
'''


def test_plain_python_with_jit_disabled(run_python):
    proc = run_python(SCRIPT, {"NUMBA_DISABLE_JIT": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["OK"]
