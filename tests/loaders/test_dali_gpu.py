"""The DALI backend's GPU path (mixed nvJPEG decoder, GPU resize/colour ops, our CUDA mix kernel)
against its CPU path on the same files and view parameters (markers gpu and dali: run on a lent GPU)."""
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install '.[dali]')")
pytestmark = [pytest.mark.gpu, pytest.mark.dali]

from loaders.dali_backend import DaliTrainLoader  # noqa: E402
from mixmask.mixing import MixMask, MixStage  # noqa: E402
from loaders.folder import index_split  # noqa: E402
from loaders.torchvision_backend import AugParams  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def batches(root, device, aug, dtype=torch.float32):
    st = MixStage(MEAN, STD, dtype=dtype, channels_last=True, mixer=MixMask(grid=4, per_sample=True))
    ld = DaliTrainLoader(index_split(root, "train"), aug, st, 16, threads=2, seed=0, device=device)
    ld.set_epoch(0)
    return list(ld)


def test_gpu_views_match_cpu_views(tiny_data):
    """Geometry only (no colour or blur): GPU and CPU decode + resize agree to a few levels, and the
    mixing on the GPU (CUDA kernel) takes its pixels from the right sources."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    aug = AugParams(32, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    g, c = batches(tiny_data, "cuda", aug), batches(tiny_data, "cpu", aug)
    assert len(g) == len(c) == 5
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    for bg, bc in zip(g, c):
        assert bg.x1.is_cuda and bg.x1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(bg.index, bc.index) and torch.equal(bg.labels.cpu(), bc.labels)
        for a, b in ((bg.x1, bc.x1), (bg.x2, bc.x2), (bg.mixed, bc.mixed)):
            diff = ((a.cpu() - b) * std).abs()  # in 0-255 levels
            # nvJPEG and libjpeg-turbo upsample chroma differently: 3.1 levels on average on the H100
            assert diff.mean() < 5.0 and diff.max() < 80, (diff.mean(), diff.max())
        assert torch.equal(bg.perm.cpu(), bc.perm) and torch.equal(bg.lam.cpu(), bc.lam)


def test_gpu_full_recipe_runs_and_is_deterministic(tiny_data):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    aug = AugParams(32)
    a, b = batches(tiny_data, "cuda", aug, torch.bfloat16), batches(tiny_data, "cuda", aug, torch.bfloat16)
    for x, y in zip(a, b):
        assert x.x1.dtype == torch.bfloat16 and torch.isfinite(x.x1.float()).all()
        assert torch.equal(x.index, y.index)
        assert (x.x1.float() - y.x1.float()).abs().mean() < 0.05  # nvJPEG/hardware decode may differ slightly
