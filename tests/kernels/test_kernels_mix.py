"""Fused MixMask mix + normalise + convert on the CPU (kernels/mix.py): njit and plain Python
against the numpy reference, the reference against the formula and torch, argument checks."""
import numpy as np
import pytest

from kernels import fused_mix, fused_mix_reference, mix, realised_lam, sample_masks

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}

# (N, H, W, g, perm): odd N, N = 1, identity perm, g not dividing H or W, non-square,
# g > H (cells without pixels)
SHAPES = [(3, 8, 6, 4, "random"), (1, 7, 5, 3, "identity"), (5, 9, 12, 5, "roll"), (2, 4, 3, 8, "reverse")]
MASKS = ["none", "per_batch", "per_sample"]


def make_case(N, H, W, g, perm_kind, masks_kind, dtype, layout, seed=0):
    rng = np.random.default_rng(seed)
    v1 = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)  # (N, H, W, 3)
    v2 = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    perm = {"random": rng.permutation(N), "identity": np.arange(N), "roll": np.roll(np.arange(N), 1),
            "reverse": np.arange(N)[::-1]}[perm_kind].astype(np.int64)
    M = {"none": 0, "per_batch": 1, "per_sample": N}[masks_kind]
    masks = sample_masks("discrete", M, g, 0.5, seed, 0, 0) if M else None  # (M, g, g)
    shape = (N, H, W, 3) if layout == "channels_last" else (N, 3, H, W)
    outs = [np.full(shape, 7, DTYPES[dtype]) for _ in range(3)]
    return v1, v2, masks, perm, outs


def run_cpu(backend, v1, v2, masks, perm, outs, layout):
    if backend == "njit":
        fused_mix(v1, v2, masks, perm, MEAN, STD, *outs, layout=layout)
    else:  # the same kernel as plain Python (what NUMBA_DISABLE_JIT=1 does)
        mix._mix_rows.py_func(*mix.prepare_cpu(v1, v2, masks, perm, MEAN, STD, *outs, layout=layout))


def assert_bits_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + s[4])
@pytest.mark.parametrize("masks_kind", MASKS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_fused_mix_matches_reference(shape, masks_kind, dtype, layout, backend):
    v1, v2, masks, perm, outs = make_case(*shape, masks_kind, dtype, layout)
    refs = [o.copy() for o in outs]
    run_cpu(backend, v1, v2, masks, perm, outs, layout)
    fused_mix_reference(v1, v2, masks, perm, MEAN, STD, *refs, layout=layout)
    for got, want in zip(outs, refs):
        assert_bits_equal(got, want)
    if masks is None:  # outm untouched when masking is off
        assert (outs[2] == 7).all()


def test_realistic_shape_matches_reference():
    v1, v2, masks, perm, outs = make_case(4, 224, 224, 8, "roll", "per_sample", "bfloat16", "channels_last")
    masks[:] = sample_masks("block", 4, 8, 0.5, 1, 0, 0)
    refs = [o.copy() for o in outs]
    fused_mix(v1, v2, masks, perm, MEAN, STD, *outs)
    fused_mix_reference(v1, v2, masks, perm, MEAN, STD, *refs)
    for got, want in zip(outs, refs):
        assert_bits_equal(got, want)


# --- the reference itself, against the formula written differently, and against torch ---------

@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_reference_is_the_formula(layout):
    N, H, W, g = 3, 10, 7, 4
    v1, v2, masks, perm, outs = make_case(N, H, W, g, "random", "per_sample", "float32", layout, seed=3)
    fused_mix_reference(v1, v2, masks, perm, MEAN, STD, *outs, layout=layout)
    o1, o2, om = (o if layout == "channels_last" else o.transpose(0, 2, 3, 1) for o in outs)
    for j in range(N):
        for y in range(H):
            for x in range(W):
                keep = masks[j, (y * g) // H, (x * g) // W] == 1
                for c in range(3):
                    assert o1[j, y, x, c] == np.float32((np.float32(v1[j, y, x, c]) - MEAN[c]) / STD[c])
                    assert o2[j, y, x, c] == np.float32((np.float32(v2[j, y, x, c]) - MEAN[c]) / STD[c])
                    assert om[j, y, x, c] == o1[j if keep else perm[j], y, x, c]
    # outm agrees with out1 on at least the realised kept fraction lam (more only by coincidence)
    same = (om == o1).all(axis=3).mean(axis=(1, 2))
    lam = realised_lam(masks, H, W)
    assert np.all(same >= lam - 1e-6) and np.all(same <= lam + 0.2)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * 3,
        np.array([0, -0.0, 1, -1, 3.0e38, -3.4e38, 1e-40, -1e-45, np.inf, -np.inf,
                  65504, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9], np.float32),  # ties, overflow
        (np.arange(256, dtype=np.float32)[:, None] - MEAN) .ravel() / np.tile(STD, 256),
    ]).astype(np.float32)
    ours = mix.float32_to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    # NaN cannot come out of the kernels (mean/std finite, std != 0); torch's scalar path gives 0x7FC0,
    # its vectorised CPU path 0xFFFF. Ours follows the scalar rule.
    assert mix.float32_to_bfloat16_bits(np.array([np.nan], np.float32))[0] == 0x7FC0


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fused_mix_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    v1, v2, masks, perm, outs = make_case(3, 16, 20, 8, "random", "per_sample", dtype, "nchw", seed=5)
    fused_mix(v1, v2, masks, perm, MEAN, STD, *outs, layout="nchw")
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    mean = torch.from_numpy(MEAN).view(1, 3, 1, 1)
    std = torch.from_numpy(STD).view(1, 3, 1, 1)
    x1 = (torch.from_numpy(v1).permute(0, 3, 1, 2).float() - mean) / std  # (N, 3, H, W)
    x2 = (torch.from_numpy(v2).permute(0, 3, 1, 2).float() - mean) / std
    rows, cols = (np.arange(16) * 8) // 16, (np.arange(20) * 8) // 20
    up = torch.from_numpy(masks[:, rows][:, :, cols].astype(bool))[:, None]  # (N, 1, H, W)
    xm = torch.where(up, x1, x1[torch.from_numpy(perm)])
    for got, want in zip(outs, (x1, x2, xm)):
        want = want.to(tdt)
        if dtype == "bfloat16":
            want = want.view(torch.int16).view(torch.uint16) if hasattr(torch, "uint16") else want.view(torch.int16)
        np.testing.assert_array_equal(got.view(np.uint8), want.contiguous().numpy().view(np.uint8))


# --- argument checks ---------------------------------------------------------------------------

def _args(**over):
    v1, v2, masks, perm, outs = make_case(2, 4, 6, 2, "roll", "per_sample", "float32", "channels_last")
    a = dict(v1=v1, v2=v2, masks=masks, perm=perm, mean=MEAN, std=STD, out1=outs[0], out2=outs[1],
             outm=outs[2], layout="channels_last")
    a.update(over)
    return a


@pytest.mark.parametrize("bad,exc", [
    (lambda a: dict(layout="nhwc"), ValueError),
    (lambda a: dict(out1=a["out1"].transpose(0, 3, 1, 2)), ValueError),            # wrong shape
    (lambda a: dict(out2=np.empty_like(a["out2"], np.float16)), TypeError),         # mixed dtypes
    (lambda a: dict(out1=np.empty(a["out1"].shape, np.float64)), TypeError),
    (lambda a: dict(v1=a["v1"].astype(np.int16)), TypeError),
    (lambda a: dict(masks=np.ones((3, 2, 2), np.uint8)), ValueError),                # M not in {1, N}
    (lambda a: dict(perm=np.array([0, 2], np.int64)), ValueError),                   # out of range
    (lambda a: dict(perm=np.array([1, 0], np.int32)), ValueError),
    (lambda a: dict(outm=a["out1"]), ValueError),                                    # x1 must stay clean
    (lambda a: dict(outm=None), ValueError),
    (lambda a: dict(std=np.array([1, 0, 1], np.float32)), ValueError),
    (lambda a: dict(out1=np.empty((2, 6, 4, 3), np.float32)[:, ::-1].transpose(0, 2, 1, 3)), ValueError),
])
def test_bad_arguments(bad, exc):
    a = _args()
    a.update(bad(a))
    with pytest.raises(exc):
        fused_mix(**a)


def test_bf16_from_int16_buffer_and_torch_channels_last_view():
    torch = pytest.importorskip("torch")
    v1, v2, masks, perm, _ = make_case(2, 6, 5, 3, "roll", "per_batch", "float32", "channels_last")
    ts = [torch.empty(2, 3, 6, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last) for _ in range(3)]
    bufs = [t.view(torch.int16).permute(0, 2, 3, 1).numpy() for t in ts]  # (N, H, W, 3) int16 views
    fused_mix(v1, v2, masks, perm, MEAN, STD, *bufs)
    ref = [np.empty((2, 6, 5, 3), np.uint16) for _ in range(3)]
    fused_mix_reference(v1, v2, masks, perm, MEAN, STD, *ref)
    for t, r in zip(ts, ref):
        np.testing.assert_array_equal(t.permute(0, 2, 3, 1).view(torch.int16).numpy().view(np.uint16), r)


# --- hand-made masks: rows fully kept, fully replaced, single cells ----------------------------

@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_extreme_masks(layout, backend):
    N, H, W, g = 3, 10, 9, 4
    v1, v2, _, perm, outs = make_case(N, H, W, g, "roll", "none", "float16", layout, seed=9)
    masks = np.ones((N, g, g), np.uint8)   # sample 0: all kept (outm = out1)
    masks[1] = 0                            # sample 1: all replaced (outm = out1[perm])
    masks[2, 1:3] = 0                       # sample 2: some rows kept, some mixed, one cell
    masks[2, 3, 2] = 0
    refs = [o.copy() for o in outs]
    run_cpu(backend, v1, v2, masks, perm, outs, layout)
    fused_mix_reference(v1, v2, masks, perm, MEAN, STD, *refs, layout=layout)
    for got, want in zip(outs, refs):
        assert_bits_equal(got, want)
    o1, om = outs[0], outs[2]
    np.testing.assert_array_equal(om[0], o1[0])
    np.testing.assert_array_equal(om[1], o1[perm[1]])


# --- the compiled building blocks against their plain-Python twins ------------------------------

def test_encode_compiled_equals_python():
    from numba import njit
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(5000) * 4, rng.standard_normal(500) * 1e5,
                        [0.0, -0.0, 65504.0, 65520.0, 1e-8, -3e38, np.inf, -np.inf,
                         1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11]]).astype(np.float32)

    @njit(error_model="numpy")
    def enc_all(x, o):
        for i in range(x.shape[0]):
            o[i] = mix.encode(x[i], o)

    for dt in (np.float32, np.int16, np.uint16):
        got = np.empty(x.shape, dt)
        enc_all(x, got)
        want = np.array([mix.encode(v, got) for v in x], dt)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    f16 = np.empty(x.shape, np.int16)
    enc_all(x, f16)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(f16.view(np.float16), x.astype(np.float16))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_stream_store_any_alignment(dtype):
    from numba import njit

    @njit
    def store(d, j, i, off, s):
        mix.stream_store(d, j, i, off, s)
        mix.store_fence()

    rng = np.random.default_rng(2)
    base = np.zeros(2 * 3 * 300 + 64, dtype)
    for shift in (0, 1, 3):  # buffer start at different alignments
        dst = base[shift:shift + 2 * 3 * 300].reshape(2, 3, 300)
        for n in (0, 1, 31, 32, 33, 64, 100, 257):
            for off in (0, 5, 300 - n):
                src = rng.integers(1, 1000, n).astype(dtype)
                for fn in (store, store.py_func):
                    dst[:] = 0
                    fn(dst, 1, 2, off, src)
                    want = np.zeros_like(dst)
                    want[1, 2, off:off + n] = src
                    np.testing.assert_array_equal(dst, want)


# --- the cheaper normalisation forms (fma / multiply), used only where exhaustively exact --------

def _stats_for_form(kind, form):
    """Deterministic search for (mean, std) whose cheapest exact form for `kind` is `form`."""
    rng = np.random.default_rng(1234)
    for _ in range(400):
        mean = rng.uniform(0, 255, 3).astype(np.float32)
        std = rng.uniform(20, 100, 3).astype(np.float32)
        if mix.fast_form(mean.tobytes(), std.tobytes(), kind) == form:
            return mean, std
    pytest.fail(f"no statistics found whose form is {form} for {kind}")


def test_imagenet_forms():
    assert mix.fast_form(MEAN.tobytes(), STD.tobytes(), "float16") == "fma"
    assert mix.fast_form(MEAN.tobytes(), STD.tobytes(), "bfloat16") == "fma"
    assert mix.fast_form(MEAN.tobytes(), STD.tobytes(), "float32") == "div"


@pytest.mark.parametrize("kind,form", [("float16", "fma"), ("float16", "mul"), ("float16", "div"),
                                       ("bfloat16", "fma"), ("float32", "div")])
def test_every_form_matches_reference(kind, form, backend):
    mean, std = (MEAN, STD) if (kind, form) in {("float16", "fma"), ("bfloat16", "fma"), ("float32", "div")} \
        else _stats_for_form(kind, form)
    v1, v2, masks, perm, outs = make_case(4, 9, 14, 5, "random", "per_sample", kind, "channels_last", seed=4)
    refs = [o.copy() for o in outs]
    args = mix.prepare_cpu(v1, v2, masks, perm, mean, std, *outs)
    fast = args[6]
    assert {None: "div", 1: "mul", 2: "fma"}[None if fast is None else fast.ndim] == form
    (mix._mix_rows if backend == "njit" else mix._mix_rows.py_func)(*args)
    fused_mix_reference(v1, v2, masks, perm, mean, std, *refs)
    for got, want in zip(outs, refs):
        assert_bits_equal(got, want)
