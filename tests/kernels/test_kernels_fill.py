"""Float kernels of the masking family on the CPU (kernels/fill.py): noise fill, high-pass filter, mixup.

njit and plain Python (the dispatchers' py_func) against the numpy references; the references against
the formulas written out again here and (high_pass) against torchvision; noise statistics, keying and
provenance; argument checks."""
import math

import numpy as np
import pytest

from kernels import fill as kf
from kernels.rng import STREAM_SHIFT, uniform4_reference


def make_x(N, C, H, W, layout, seed):
    """Logical (N, C, H, W) float32; "channels_last": a strided view of an NHWC array (torch's layout)."""
    rng = np.random.default_rng(seed)
    if layout == "channels_last":
        x = rng.standard_normal((N, H, W, C)).astype(np.float32).transpose(0, 3, 1, 2)
        assert x.strides[1] == 4 and (C == 1 or not x.flags.c_contiguous)  # C = 1: the same memory as NCHW
        return x
    return rng.standard_normal((N, C, H, W)).astype(np.float32)


def empty_like_layout(x, layout, fill=7.0):
    N, C, H, W = x.shape
    if layout == "channels_last":
        return np.full((N, H, W, C), fill, np.float32).transpose(0, 3, 1, 2)
    return np.full((N, C, H, W), fill, np.float32)


def run_noise(backend, x, masks, boxes, std, seed, epoch, batch_index, stream):
    if backend == "njit":
        kf.noise_fill_(x, masks, boxes, std, seed, epoch, batch_index, stream)
    else:  # the same kernel as plain Python, with the arguments the public wrapper prepares
        kf.check_fill(x, masks, boxes)
        kf._noise_fill.py_func(x, np.ascontiguousarray(masks), np.ascontiguousarray(boxes), float(std),
                               np.uint64(seed), np.int64(epoch), np.int64(batch_index), np.int64(stream))


def run_high_pass(backend, x, out, ksize, sigma):
    if backend == "njit":
        kf.high_pass(x, out, ksize, sigma)
    else:
        kf._high_pass.py_func(x, out, kf.gaussian_taps(ksize, sigma))


def run_mixup(backend, x, perm, lam, out):
    if backend == "njit":
        kf.mixup(x, perm, lam, out)
    else:
        kf._mixup.py_func(x, np.ascontiguousarray(perm), np.ascontiguousarray(lam, np.float32), out)


def fill_set(masks, boxes, C, H, W):
    """(N, C, H, W) bool, written element by element from the noise_fill_ docstring."""
    N, Cm, gh, gw = masks.shape
    out = np.zeros((N, C, H, W), bool)
    for j in range(N):
        top, left, h, w = (int(v) for v in boxes[j])
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    cell = masks[j, c if Cm > 1 else 0, (y * gh) // H, (x * gw) // W] == 0
                    focal = h > 0 and not (top <= y < top + h and left <= x < left + w)
                    out[j, c, y, x] = cell or focal
    return out


def normal_formula(seed, epoch, batch_index, j, stream, e):
    """z_j(e) by Box-Muller on one Philox call, straight from the docstring (scalar math module)."""
    u = uniform4_reference(seed, epoch, batch_index, j, (stream << STREAM_SHIFT) + e // 4)
    lane = e % 4
    a, b = (u[0], u[1]) if lane < 2 else (u[2], u[3])
    r = math.sqrt(-2.0 * math.log(1.0 - a))
    return r * (math.cos(2 * math.pi * b) if lane % 2 == 0 else math.sin(2 * math.pi * b))


# --- noise_fill_ ---------------------------------------------------------------------------------

# N, C, H, W, Cm, g, box of sample 0 (None: no window), layout, (seed, epoch, batch_index, stream)
NOISE_CASES = [
    (2, 3, 10, 7, 1, 3, None, "channels_last", (123, 0, 0, 1)),            # spatial masks, g divides neither
    (3, 3, 8, 8, 3, 4, None, "nchw", (2 ** 64 - 5, 2 ** 32 - 1, 17, 2)),    # channel-wise, full key range
    (2, 3, 9, 6, 3, 4, (2, 1, 4, 3), "channels_last", (9, 1, 2, 1)),       # channel-wise + focal window
    (2, 3, 6, 7, 1, 2, (1, 2, 3, 4), "nchw", (42, 2, 5, 2)),               # spatial + focal window
    (2, 3, 5, 6, 1, 8, None, "channels_last", (7, 0, 1, 1)),               # g > H, W: cells without pixels
    (1, 1, 9, 12, 1, 5, (0, 0, 9, 12), "nchw", (5, 3, 3, 1)),              # C = 1, window = whole image
]


@pytest.mark.parametrize("case", NOISE_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[7]}-box{c[6] is not None}")
def test_noise_fill_matches_reference(case, backend):
    N, C, H, W, Cm, g, box, layout, keys = case
    rng = np.random.default_rng(H * 31 + W)
    masks = (rng.random((N, Cm, g, g)) < 0.6).astype(np.uint8)
    boxes = np.zeros((N, 4), np.int64)
    if box is not None:
        boxes[0] = box
    x = make_x(N, C, H, W, layout, seed=g)
    before = x.copy()
    want = x.copy()
    kf.noise_fill_reference(want, masks, boxes, 0.75, *keys)
    fill = fill_set(masks, boxes, C, H, W)
    assert fill.any() and not fill.all()  # not vacuous either way
    np.testing.assert_array_equal(kf.filled_reference(masks, boxes, C, H, W), fill)
    run_noise(backend, x, masks, boxes, 0.75, *keys)
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(x[~fill], before[~fill])
    assert (x[fill] != before[fill]).all()


def test_normals_reference_is_the_formula():
    keys = (2 ** 63 + 11, 4, 9, 3, 2)
    z = kf.normals_reference(*keys, 23)  # count not a multiple of 4
    assert z.shape == (23,) and z.dtype == np.float64
    for e in range(23):
        assert z[e] == pytest.approx(normal_formula(*keys, e), rel=1e-12, abs=1e-12)


def test_provenance_every_element_is_input_or_its_noise():
    """noise_fill_ writes std * z_j(e) at exactly the masked elements, nothing elsewhere."""
    N, C, H, W, g, std = 3, 3, 11, 13, 4, 0.3
    keys = (77, 5, 6, 2)
    rng = np.random.default_rng(4)
    masks = (rng.random((N, C, g, g)) < 0.5).astype(np.uint8)
    masks[1] = 1                     # sample 1: no masked cell, but a focal window
    boxes = np.zeros((N, 4), np.int64)
    boxes[1] = (3, 4, 5, 6)
    masks[2] = 0                     # sample 2: everything masked
    x = make_x(N, C, H, W, "channels_last", seed=8)
    before = x.copy()
    kf.noise_fill_(x, masks, boxes, std, *keys)
    fill = fill_set(masks, boxes, C, H, W)
    for j in range(N):
        noise = (std * kf.normals_reference(*keys[:3], j, keys[3], C * H * W)).astype(np.float32).reshape(C, H, W)
        np.testing.assert_array_equal(x[j][fill[j]], noise[fill[j]])
        np.testing.assert_array_equal(x[j][~fill[j]], before[j][~fill[j]])
        assert ((x[j] == before[j]) | (x[j] == noise)).all()
    assert fill[2].all() and fill[1].sum() == C * (H * W - 5 * 6)
    np.testing.assert_array_equal(x[1, :, 3:8, 4:10], before[1, :, 3:8, 4:10])  # inside the window: kept


def test_noise_depends_only_on_keys_and_element():
    """A resumed run draws the same noise: z_j(e) does not depend on the mask or on the other samples."""
    N, C, H, W, g = 3, 3, 12, 10, 3
    keys = (3, 1, 4, 1)
    all_masked = np.zeros((N, 1, g, g), np.uint8)
    full = np.zeros((N, C, H, W), np.float32)
    kf.noise_fill_(full, all_masked, np.zeros((N, 4), np.int64), 0.5, *keys)
    part_masks = (np.random.default_rng(0).random((N, C, g, g)) < 0.5).astype(np.uint8)
    part = np.full((N, C, H, W), np.nan, np.float32)
    kf.noise_fill_(part, part_masks, np.zeros((N, 4), np.int64), 0.5, *keys)
    done = ~np.isnan(part)
    assert done.any() and not done.all()
    np.testing.assert_array_equal(part[done], full[done])
    # sample j's noise is the same whatever the batch size around it
    one = np.zeros((1, C, H, W), np.float32)
    kf.noise_fill_(one, all_masked[:1], np.zeros((1, 4), np.int64), 0.5, *keys)
    np.testing.assert_array_equal(one[0], full[0])
    again = np.zeros_like(full)
    kf.noise_fill_(again, all_masked, np.zeros((N, 4), np.int64), 0.5, *keys)
    np.testing.assert_array_equal(again, full)


def test_noise_statistics():
    N, C, H, W, std = 2, 3, 64, 64, 0.18
    x = np.full((N, C, H, W), 5.0, np.float32)
    kf.noise_fill_(x, np.zeros((N, 1, 4, 4), np.uint8), np.zeros((N, 4), np.int64), std, 2024, 0, 0, 1)
    z = x.astype(np.float64).ravel()
    n = z.size
    assert (z != 5.0).all()
    # standard errors: mean std/sqrt(n), sample std ~ std/sqrt(2n), a fraction p: sqrt(p(1-p)/n); 5 sigma
    assert abs(z.mean()) < 5 * std / math.sqrt(n)
    assert abs(z.std() - std) < 5 * std / math.sqrt(2 * n)
    for k, p in ((1, 0.682689492), (2, 0.954499736)):
        assert abs((np.abs(z) < k * std).mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    for j in range(N):  # each sample on its own, n/2 values
        zj = x[j].astype(np.float64).ravel()
        assert abs(zj.mean()) < 5 * std / math.sqrt(zj.size)
        assert abs(zj.std() - std) < 5 * std / math.sqrt(2 * zj.size)
    # neighbours (same Philox call and Box-Muller pair, and across calls) are uncorrelated: |rho| < 5/sqrt(n)
    flat = x.reshape(N, -1).astype(np.float64)
    for lag in (1, 2, 4, W):
        rho = np.corrcoef(flat[:, :-lag].ravel(), flat[:, lag:].ravel())[0, 1]
        assert abs(rho) < 5 / math.sqrt(n - N * lag), lag
    rho = np.corrcoef(flat[0], flat[1])[0, 1]  # the two samples
    assert abs(rho) < 5 / math.sqrt(flat.shape[1])


def test_noise_differs_between_cells_samples_streams_and_keys():
    """Regression: the reference code of Chin et al. reused one noise patch for every masked cell."""
    N, C, H, W, g = 2, 3, 16, 16, 4  # 4x4-pixel cells
    masks = np.ones((N, 1, g, g), np.uint8)
    masks[:, 0, 0, 0] = 0
    masks[:, 0, 2, 3] = 0
    boxes = np.zeros((N, 4), np.int64)

    def filled(seed=1, epoch=0, batch_index=0, stream=1):
        x = np.zeros((N, C, H, W), np.float32)
        kf.noise_fill_(x, masks, boxes, 0.18, seed, epoch, batch_index, stream)
        return x

    x = filled()
    a, b = x[:, :, 0:4, 0:4], x[:, :, 8:12, 12:16]
    assert (a != 0).all() and (b != 0).all()
    assert np.count_nonzero(x) == N * C * 2 * 16  # nothing outside the two cells
    assert not np.array_equal(a, b) and not np.array_equal(a, -b)
    assert (a != b).mean() > 0.99
    assert (x[0] != x[1])[x[0] != 0].mean() > 0.99  # the two samples
    assert (x[0, 0] != x[0, 1])[x[0, 0] != 0].mean() > 0.99  # channels of a spatial cell
    for other in (dict(stream=2), dict(batch_index=1), dict(epoch=1), dict(seed=2)):
        y = filled(**other)
        assert (y != 0).sum() == (x != 0).sum()
        assert (y != x)[x != 0].mean() > 0.99, other
    np.testing.assert_array_equal(filled(), x)


# --- high_pass -----------------------------------------------------------------------------------

# N, C, H, W, ksize, sigma, layout of x, layout of out
HP_CASES = [
    (2, 3, 12, 9, 5, 1.3, "channels_last", "channels_last"),
    (1, 3, 16, 16, 11, 5.0, "nchw", "nchw"),
    (2, 1, 6, 13, 11, 5.0, "channels_last", "nchw"),   # H = ksize // 2 + 1: the reflect limit
    (1, 2, 7, 5, 3, 0.8, "nchw", "channels_last"),
    (2, 3, 4, 4, 1, 1.0, "nchw", "nchw"),              # ksize 1: the blur is x itself
]


@pytest.mark.parametrize("case", HP_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-{c[7]}")
def test_high_pass_matches_reference(case, backend):
    N, C, H, W, k, sigma, lx, lo = case
    x = make_x(N, C, H, W, lx, seed=H + k)
    before = x.copy()
    out = empty_like_layout(x, lo)
    want = np.zeros((N, C, H, W), np.float32)
    kf.high_pass_reference(x, want, k, sigma)
    run_high_pass(backend, x, out, k, sigma)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(x, before)  # x untouched
    if k == 1:
        assert (out == 0).all()
    else:
        assert np.abs(out).max() > 0.1  # not vacuous


@pytest.mark.parametrize("N,C,H,W,k,sigma,layout", [(2, 3, 24, 19, 11, 5.0, "channels_last"),
                                                     (1, 3, 9, 14, 5, 1.2, "nchw"),
                                                     (2, 2, 8, 8, 7, 0.7, "channels_last")])
def test_high_pass_matches_torchvision(N, C, H, W, k, sigma, layout):
    torch = pytest.importorskip("torch")
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = make_x(N, C, H, W, layout, seed=k * 7 + H)
    t = torch.from_numpy(np.ascontiguousarray(x))
    want = (t - tvf.gaussian_blur(t, [k, k], [sigma, sigma])).numpy()
    out = empty_like_layout(x, layout)
    kf.high_pass(x, out, k, sigma)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    ref = np.zeros_like(want)
    kf.high_pass_reference(x, ref, k, sigma)
    np.testing.assert_allclose(ref, want, rtol=0, atol=1e-5)


def test_gaussian_taps_formula():
    for k, sigma in ((1, 1.0), (3, 0.8), (11, 5.0), (7, 100.0)):
        g = kf.gaussian_taps(k, sigma)
        want = np.array([math.exp(-0.5 * ((i - (k - 1) / 2) / sigma) ** 2) for i in range(k)])
        np.testing.assert_allclose(g, want / want.sum(), rtol=1e-6)
        assert g.dtype == np.float32 and abs(float(g.sum(dtype=np.float64)) - 1) < 1e-6


def test_high_pass_of_constant_and_linear_images():
    """The blur keeps constants; reflect padding makes a linear ramp's blur exact away from the border."""
    x = np.full((1, 2, 9, 10), 3.25, np.float32)
    out = np.ones_like(x)
    kf.high_pass(x, out, 5, 2.0)
    np.testing.assert_allclose(out, 0, atol=1e-6)
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (1, 1, 9, 10)).copy()
    out = np.ones_like(ramp)
    kf.high_pass(ramp, out, 5, 2.0)
    np.testing.assert_allclose(out[..., 2:-2], 0, atol=1e-5)  # a symmetric kernel on a line
    # at the border reflect padding folds the ramp: x[-1] = x[1] -> the blur lies above x at column 0
    assert (out[..., 0] < -0.1).all() and (out[..., -1] > 0.1).all()


# --- mixup ---------------------------------------------------------------------------------------

# N, C, H, W, layout of x, layout of out, perm kind, lam dtype
MIX_CASES = [
    (3, 3, 5, 6, "nchw", "nchw", "random", np.float32),
    (2, 3, 5, 7, "channels_last", "channels_last", "roll", np.float64),
    (4, 1, 3, 4, "channels_last", "nchw", "reverse", np.float32),
    (1, 3, 4, 4, "nchw", "channels_last", "identity", np.float64),
]


@pytest.mark.parametrize("case", MIX_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-{c[4]}-{c[5]}-{c[6]}")
def test_mixup_matches_reference(case, backend):
    N, C, H, W, lx, lo, kind, ldt = case
    rng = np.random.default_rng(N * 10 + W)
    x = make_x(N, C, H, W, lx, seed=N + W)
    before = x.copy()
    perm = {"random": rng.permutation(N), "roll": np.roll(np.arange(N), 1), "reverse": np.arange(N)[::-1],
            "identity": np.arange(N)}[kind].astype(np.int64)
    lam = rng.random(N).astype(ldt)
    lam[0] = 0.3  # not representable in float32: the float64 -> float32 rounding matters
    out = empty_like_layout(x, lo)
    want = np.zeros((N, C, H, W), np.float32)
    kf.mixup_reference(x, perm, lam, want)
    run_mixup(backend, x, perm, lam, out)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(x, before)
    # the formula, element by element in float32 scalars
    for j in range(N):
        a = np.float32(lam[j])
        b = np.float32(1) - a
        for c in range(C):
            for y in range(H):
                for xx in range(W):
                    assert out[j, c, y, xx] == a * x[j, c, y, xx] + b * x[perm[j], c, y, xx]


def test_mixup_limits():
    x = make_x(3, 3, 4, 5, "channels_last", seed=1)
    perm = np.array([2, 0, 1], np.int64)
    out = np.zeros((3, 3, 4, 5), np.float32)
    kf.mixup(x, perm, np.ones(3, np.float32), out)
    np.testing.assert_array_equal(out, x)
    kf.mixup(x, perm, np.zeros(3, np.float32), out)
    np.testing.assert_array_equal(out, x[perm])
    kf.mixup(x, perm, np.full(3, 0.5, np.float32), out)
    np.testing.assert_allclose(out, (x.astype(np.float64) + x[perm]) / 2, rtol=0, atol=1e-6)


# --- argument checks -----------------------------------------------------------------------------

def _fill_args(**over):
    a = dict(x=np.zeros((2, 3, 6, 5), np.float32), masks=np.ones((2, 1, 3, 3), np.uint8),
             boxes=np.zeros((2, 4), np.int64), std=0.5, seed=0, epoch=0, batch_index=0, stream=1)
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc", [
    (dict(x=np.zeros((2, 3, 6, 5), np.float64)), TypeError),
    (dict(x=np.zeros((2, 3, 6, 5), np.float16)), TypeError),
    (dict(x=np.zeros((3, 6, 5), np.float32)), ValueError),
    (dict(masks=np.ones((2, 1, 3, 3), np.int64)), TypeError),
    (dict(masks=np.ones((2, 1, 3, 3), bool)), TypeError),
    (dict(masks=np.ones((2, 2, 3, 3), np.uint8)), ValueError),       # Cm not in {1, C}
    (dict(masks=np.ones((1, 1, 3, 3), np.uint8)), ValueError),       # N differs
    (dict(masks=np.ones((2, 3, 3), np.uint8)), ValueError),
    (dict(masks=np.ones((2, 1, 0, 3), np.uint8)), ValueError),       # empty grid
    (dict(boxes=np.zeros((2, 4), np.int32)), ValueError),
    (dict(boxes=np.zeros((2, 3), np.int64)), ValueError),
    (dict(x=np.broadcast_to(np.float32(0), (1, 5, 4096, 4096)), masks=np.ones((1, 1, 2, 2), np.uint8),
          boxes=np.zeros((1, 4), np.int64)), ValueError),              # 5 * 2**24 > 2**26 elements: one stream
])
def test_noise_fill_bad_arguments(over, exc):
    a = _fill_args(**over)
    before = a["x"].copy() if a["x"].size < 10 ** 6 else None  # (the big case is a zero-stride view)
    with pytest.raises(exc):
        kf.noise_fill_(**a)
    with pytest.raises(exc):
        kf.noise_fill_reference(**a)
    if before is not None:
        np.testing.assert_array_equal(a["x"], before)


def test_high_pass_bad_arguments():
    x = np.zeros((2, 3, 8, 8), np.float32)
    out = np.zeros_like(x)
    for bad_x, bad_out, exc in [(x.astype(np.float64), out, TypeError), (x, out.astype(np.float64), TypeError),
                                (x, np.zeros((2, 3, 8, 7), np.float32), ValueError),
                                (x[0], out[0], ValueError)]:
        with pytest.raises(exc):
            kf.high_pass(bad_x, bad_out)
        with pytest.raises(exc):
            kf.high_pass_reference(bad_x, bad_out)
    for k, sigma in ((4, 1.0), (0, 1.0), (3, 0.0), (3, -1.0)):
        with pytest.raises(ValueError):
            kf.high_pass(x, out, k, sigma)
    with pytest.raises(ValueError):
        kf.high_pass(x, out, 17, 5.0)  # reflect padding of 8 needs H, W > 8
    with pytest.raises(ValueError):
        kf.high_pass(x, x, 3, 1.0)     # in place would read blurred values
    with pytest.raises(ValueError):
        kf.high_pass(x, x.transpose(0, 1, 3, 2), 3, 1.0)


def test_mixup_bad_arguments():
    x = np.zeros((3, 3, 4, 4), np.float32)
    out = np.zeros_like(x)
    perm = np.array([1, 2, 0], np.int64)
    lam = np.full(3, 0.5, np.float32)
    for args, exc in [((x.astype(np.float64), perm, lam, out), TypeError),
                      ((x, perm, lam, out.astype(np.float16)), TypeError),
                      ((x, perm, lam, out[:2]), ValueError),
                      ((x, perm.astype(np.int32), lam, out), ValueError),
                      ((x, perm[:2], lam, out), ValueError),
                      ((x, perm, lam[:2], out), ValueError),
                      ((x, perm, lam, x), ValueError)]:
        with pytest.raises(exc):
            kf.mixup(*args)
        with pytest.raises(exc):
            kf.mixup_reference(*args)


def test_mixup_rejects_perm_out_of_range(monkeypatch):
    called = []
    monkeypatch.setattr(kf, "_mixup", lambda *a: called.append(a))  # never run the kernel out of bounds
    x = np.zeros((2, 3, 4, 4), np.float32)
    for perm in ([0, 2], [-1, 0]):
        with pytest.raises(ValueError):
            kf.mixup(x, np.array(perm, np.int64), np.full(2, 0.5, np.float32), np.zeros_like(x))
    assert not called
