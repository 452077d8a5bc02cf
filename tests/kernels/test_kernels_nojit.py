"""NUMBA_DISABLE_JIT=1 (numba's switch) runs every CPU kernel as plain Python: check in a fresh
process that the whole CPU path (RNG, both samplers, the fused mix in every dtype and layout, the
erase/saliency cell sampler, noise fill, high-pass and mixup) still
equals the references, i.e. the kernels do not depend on compiled-only semantics."""
SCRIPT = r'''
import numba, numpy as np
assert numba.config.DISABLE_JIT
from kernels import fused_mix, fused_mix_reference, sample_masks, rng, masks, mix
assert not hasattr(mix._mix_rows, "py_func"), "njit was not disabled"
U = np.uint64
assert rng.uniform4(U(2**64 - 1), 3, 4, 5, 6) == rng.uniform4_reference(2**64 - 1, 3, 4, 5, 6)
for kind in ("block", "discrete"):
    for g, r in ((3, 0.9), (8, 0.5), (4, 0.01)):
        np.testing.assert_array_equal(sample_masks(kind, 6, g, r, 1, 2, 3),
                                      masks.sample_masks_reference(kind, 6, g, r, 1, 2, 3))
mean = np.array([123.7, 116.3, 103.5], np.float32); std = np.array([58.4, 57.1, 57.4], np.float32)
rs = np.random.default_rng(0)
N, H, W = 3, 7, 5
v1 = rs.integers(0, 256, (N, H, W, 3), dtype=np.uint8); v2 = rs.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
perm = np.array([2, 0, 1], np.int64)
n = 0
for dt in (np.float32, np.float16, np.uint16):
    for layout in ("channels_last", "nchw"):
        for M in (0, 1, N):
            m = sample_masks("block", M, 3, 0.5, 0, 0, 0) if M else None
            shape = (N, H, W, 3) if layout == "channels_last" else (N, 3, H, W)
            outs = [np.zeros(shape, dt) for _ in range(3)]; refs = [np.zeros(shape, dt) for _ in range(3)]
            fused_mix(v1, v2, m, perm, mean, std, *outs, layout=layout)
            fused_mix_reference(v1, v2, m, perm, mean, std, *refs, layout=layout)
            for o, r in zip(outs, refs):
                np.testing.assert_array_equal(o.view(np.uint8), r.view(np.uint8))
            n += 1
from kernels import cells, fill
x = rs.standard_normal((2, 3, 9, 8)).astype(np.float32)
for mode in ("uniform", "balanced", "foreground"):
    fg = (rs.random((2, 16)) < 0.5).astype(np.uint8)
    got = cells.cell_masks(fg, 2, 3, 4, 0.2, 0.6, 0.5, 0.3, 0.8, 0.55, mode, 9, 8, 1, 2, 3, 3)
    want = cells.cell_masks_reference(fg, 2, 3, 4, 0.2, 0.6, 0.5, 0.3, 0.8, 0.55, mode, 9, 8, 1, 2, 3, 3)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    y, z = x.copy(), x.copy()
    fill.noise_fill_(y, *got, 0.18, 1, 2, 3, 1)
    fill.noise_fill_reference(z, *got, 0.18, 1, 2, 3, 1)
    np.testing.assert_array_equal(y, z)
    n += 1
o, r = np.empty_like(x), np.empty_like(x)
fill.high_pass(x, o, 5, 1.0); fill.high_pass_reference(x, r, 5, 1.0); np.testing.assert_array_equal(o, r)
lam = np.array([0.25, 0.7], np.float32)
fill.mixup(x, perm[:2] % 2, lam, o); fill.mixup_reference(x, perm[:2] % 2, lam, r); np.testing.assert_array_equal(o, r)
print("OK", n + 2)
'''


def test_everything_runs_as_plain_python(run_python):
    proc = run_python(SCRIPT, {"NUMBA_DISABLE_JIT": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["OK", "23"]
