"""normalize_and_mix on every route (torch reference, Numba CPU kernel) against the formula."""

import numpy as np
import pytest
import torch

import kernels
from mixmask import masks as mk
from mixmask.fused import kernels_for, normalize, normalize_and_mix

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROUTES = ["torch"] + (["numba"] if kernels_for("cpu") is not None else [])


def reference(v1, v2, mask_full, perm, dtype):
    """Written from the formula: blend uint8 pixels with the full-size mask, then (v - m) / s in float32."""
    m = (np.asarray(MEAN, np.float64) * 255).astype(np.float32)
    s = (np.asarray(STD, np.float64) * 255).astype(np.float32)
    v1n, v2n = v1.numpy(), v2.numpy()
    blend = np.where(mask_full[..., None] == 1, v1n, v1n[perm.numpy()])  # (N, H, W, 3) uint8
    out = []
    for v in (v1n, v2n, blend):
        x = (v.astype(np.float32) - m) / s  # float32 arithmetic, (N, H, W, 3)
        out.append(torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype))
    return out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("n,h,w,per_sample", [(4, 10, 14, False), (3, 9, 7, True), (1, 8, 8, False)])
def test_matches_formula(route, dtype, channels_last, n, h, w, per_sample):
    g = torch.Generator().manual_seed(n * h)
    v1 = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    v2 = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    masks = torch.from_numpy(kernels.sample_masks("discrete", n if per_sample else 1, 4, 0.5, n * h, 0, 0))
    perm = mk.partner_permutation(n)
    full = mk.upsample(masks, h, w).expand(n, h, w).numpy()
    got = normalize_and_mix(v1, v2, masks, perm, MEAN, STD, dtype, channels_last, route)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, ref in zip(got, reference(v1, v2, full, perm, dtype)):
        assert x.dtype == dtype and x.shape == (n, 3, h, w) and x.is_contiguous(memory_format=fmt)
        assert torch.equal(x, ref)
    assert torch.equal(v1, v1.clone())


@pytest.mark.parametrize("route", ROUTES)
def test_without_masks_and_single_view(route):
    v = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    x1, x2, mixed = normalize_and_mix(v, v, None, None, MEAN, STD, torch.float32, True, route)
    assert mixed is None and torch.equal(x1, x2)
    assert torch.equal(normalize(v, MEAN, STD, torch.float32, True, route), x1)


@pytest.mark.skipif(kernels_for("cpu") is None, reason="numba not importable")
def test_routes_identical_on_a_loader_sized_batch():
    g = torch.Generator().manual_seed(1)
    v1 = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8, generator=g)
    v2 = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8, generator=g)
    masks = torch.from_numpy(kernels.sample_masks("block", 16, 8, 0.5, 1, 0, 0))
    perm = mk.partner_permutation(16, "roll")
    for dtype in (torch.float32, torch.bfloat16):
        a = normalize_and_mix(v1, v2, masks, perm, MEAN, STD, dtype, True, "torch")
        b = normalize_and_mix(v1, v2, masks, perm, MEAN, STD, dtype, True, "numba")
        assert all(torch.equal(x, y) for x, y in zip(a, b))
