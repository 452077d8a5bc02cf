"""The CUDA kernels on a real GPU (marker `gpu`; skipped without numba.cuda + torch.cuda), driven the
way the torch side drives them: torch tensors, bf16 through an int16 view, channels_last through a
permuted view, a non-default torch stream wrapped with numba.cuda.external_stream."""
import numpy as np
import pytest

from kernels import fused_mix_reference, sample_masks

pytestmark = pytest.mark.gpu

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def _require_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")
    from numba import cuda
    if not cuda.is_available():
        pytest.skip("numba.cuda cannot use the GPU (driver/toolkit missing)")
    return torch, cuda


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("masks_kind", ["none", "per_batch", "per_sample"])
@pytest.mark.parametrize("shape", [(5, 37, 29, 8), (6, 36, 64, 7), (3, 224, 224, 8)],
                         ids=["per-element", "vector-g7", "vector-224"])
@pytest.mark.parametrize("vectorize", [True, False], ids=["auto", "scalar"])
def test_gpu_matches_reference(dtype, layout, masks_kind, shape, vectorize):
    torch, cuda = _require_gpu()
    from kernels.mix_cuda import fused_mix_cuda
    N, H, W, g = shape
    rng = np.random.default_rng(N * H + W)
    v1 = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    v2 = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    perm = rng.permutation(N).astype(np.int64)
    M = {"none": 0, "per_batch": 1, "per_sample": N}[masks_kind]
    masks = sample_masks("block", M, g, 0.5, 0, 0, 0) if M else None
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dev = torch.device("cuda")
        t1, t2 = torch.from_numpy(v1).to(dev), torch.from_numpy(v2).to(dev)
        tm = torch.from_numpy(masks).to(dev) if M else None
        tp = torch.from_numpy(perm).to(dev)
        if layout == "channels_last":
            ts = [torch.empty(N, 3, H, W, dtype=tdt, device=dev).to(memory_format=torch.channels_last)
                  for _ in range(3)]
            bufs = [t.permute(0, 2, 3, 1) for t in ts]  # (N, H, W, 3), C-contiguous
        else:
            ts = [torch.empty(N, 3, H, W, dtype=tdt, device=dev) for _ in range(3)]
            bufs = ts
        if dtype == "bfloat16":
            bufs = [b.view(torch.int16) for b in bufs]
        for b in bufs:
            b.fill_(0x5A5A if b.element_size() == 2 else 7)  # poison: every element must be written
        fused_mix_cuda(t1, t2, tm, tp, MEAN, STD, *bufs, layout=layout,
                       stream=cuda.external_stream(s.cuda_stream), vectorize=vectorize)
    s.synchronize()
    npdt = np.uint16 if dtype == "bfloat16" else {"float32": np.float32, "float16": np.float16}[dtype]
    shape = (N, H, W, 3) if layout == "channels_last" else (N, 3, H, W)
    refs = [np.empty(shape, npdt) for _ in range(3)]
    fused_mix_reference(v1, v2, masks, perm, MEAN, STD, *refs, layout=layout)
    for b, r in zip(bufs[: 3 if M else 2], refs):
        got = b.contiguous().cpu().numpy()
        np.testing.assert_array_equal(got.view(np.uint8), r.view(np.uint8))
