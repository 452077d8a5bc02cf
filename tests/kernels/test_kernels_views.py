"""kernels/views.py: view parameters keyed by (seed, epoch, index, view), compiled and plain Python."""
import numpy as np

from kernels.views import draw_view_params


def draw(fn, seed, epoch, view, idx, sizes, boxes=None, alpha=0.0):
    n = len(idx)
    if boxes is None:
        boxes = np.tile(np.float32([0, 0, 1, 1]), (n, 1))  # (n, 4) whole images
    out = dict(roi=np.empty((n, 4), np.float32), flip=np.empty(n, np.int32), jitter_on=np.empty(n, np.int32),
               jitter=np.empty((n, 4), np.float32), gray=np.empty(n, np.int32), blur_on=np.empty(n, np.int32),
               sigma=np.empty(n, np.float32), solarize=np.empty(n, np.int32))
    f = np.asarray
    fn(np.uint64(seed), epoch, view, f(idx, np.int64), f(sizes, np.int64), f([0.2, 1.0]), f([0.75, 4 / 3]),
       f([0.8, 0.2, 0.5, 0.1, 0.5]), f([0.4, 0.4, 0.4, 0.1]), f([0.1, 2.0]),
       np.ascontiguousarray(boxes, np.float32), float(alpha), *out.values())
    return out


def test_plain_python_equals_compiled():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 10**6, 40)
    sizes = np.stack([rng.integers(1, 900, 40), rng.integers(1, 900, 40)], 1)
    a = draw(draw_view_params, 2**64 - 1, 3, 1, idx, sizes)
    b = draw(draw_view_params.py_func, 2**64 - 1, 3, 1, idx, sizes)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_keyed_by_sample_not_by_batch():
    idx = np.arange(100, 164)
    sizes = np.tile([[500, 375]], (64, 1))
    full = draw(draw_view_params, 7, 2, 0, idx, sizes)
    part = draw(draw_view_params, 7, 2, 0, idx[10:20], sizes[10:20])
    for k in full:
        np.testing.assert_array_equal(full[k][10:20], part[k])
    for key, args in (("seed", (8, 2, 0)), ("epoch", (7, 3, 0)), ("view", (7, 2, 1))):
        other = draw(draw_view_params, *args, idx, sizes)
        assert not np.array_equal(other["roi"], full["roi"]), key
    roi = full["roi"]
    assert (roi[:, :2] >= 0).all() and (roi[:, 2:] <= 1).all() and (roi[:, 2:] > roi[:, :2]).all()
