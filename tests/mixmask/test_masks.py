"""Partners, upsampling, realised lam and mixing (mixmask/masks.py), and MixStage's masks on every route.

The mask generators themselves are tested in tests/kernels/test_kernels_masks.py.
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from mixmask.mixing import MixMask, MixStage
from mixmask import masks as mk
from mixmask.fused import kernels_for

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample(kind, n, g, r, seed=0):
    """Kernel masks (the ones every route trains on) as a torch tensor.  # (n, g, g) uint8"""
    return torch.from_numpy(kernels.sample_masks(kind, n, g, r, seed, 0, 0))


def full_mask_loops(g_mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent reference: pixel (y, x) lies in cell (floor(y / (H/g)), floor(x / (W/g)))."""
    g = g_mask.shape[0]
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            out[y, x] = g_mask[int(np.floor(y / (h / g) + 1e-9)), int(np.floor(x / (w / g) + 1e-9))]
    return out


@pytest.mark.parametrize("kind", ["block", "discrete"])
@pytest.mark.parametrize("g,h,w", [(4, 64, 64), (8, 224, 224), (7, 50, 33), (3, 10, 17)])
def test_realised_lam_equals_area_of_upsampled_mask(kind, g, h, w):
    m = sample(kind, 5, g, 0.5, g)
    lam = mk.realised_lam(m, h, w)
    for j in range(5):
        ref = full_mask_loops(m[j].numpy(), h, w)
        assert lam[j].item() == pytest.approx(ref.mean(), abs=1e-6)
        assert torch.equal(mk.upsample(m[j : j + 1], h, w)[0], torch.from_numpy(ref))


def test_upsample_matches_interpolate_when_cells_divide():
    m = sample("discrete", 3, 8, 0.5)
    ref = F.interpolate(m[:, None].float(), size=(224, 224), mode="nearest")[:, 0].to(torch.uint8)
    assert torch.equal(mk.upsample(m, 224, 224), ref)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_partner_permutations(n):
    for how in ("reverse", "roll", "auto"):
        p = mk.partner_permutation(n, how)
        assert sorted(p.tolist()) == list(range(n))
    assert mk.partner_permutation(n, "reverse").tolist() == list(range(n))[::-1]
    if n >= 2:  # auto and roll are derangements
        for how in ("roll", "auto"):
            p = mk.partner_permutation(n, how)
            assert all(p[i] != i for i in range(n))


@pytest.mark.parametrize("per_sample", [False, True])
def test_mix_takes_pixels_from_the_right_source(per_sample):
    n, h, w = 5, 12, 9
    x1 = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()  # image j == j
    keep = x1.clone()
    m = sample("discrete", n if per_sample else 1, 4, 0.5, 6)
    perm = mk.partner_permutation(n, "roll")
    mixed = mk.mix(x1, m, perm)
    assert torch.equal(x1, keep)  # x1 untouched
    assert mixed.data_ptr() != x1.data_ptr()
    for j in range(n):
        ref = full_mask_loops(m[j if per_sample else 0].numpy(), h, w)
        expect = np.where(ref == 1, j, perm[j].item())
        assert np.array_equal(mixed[j, 0].numpy(), expect)
        assert torch.equal(mixed[j, 0], mixed[j, 2])  # same mask on every channel


@pytest.mark.skipif(kernels_for("cpu") is None, reason="numba not importable")
@pytest.mark.parametrize("kind", ["block", "discrete"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_mixstage_routes_train_on_the_same_masks(kind, per_sample):
    """route="torch" (plain-numpy sampler, torch mixing) and route="numba" (compiled sampler, fused
    kernel) give the same masks, perm, lam and views for the same (seed, epoch, step, rank)."""
    n, h, w, world = 6, 20, 13, 3
    g = torch.Generator().manual_seed(7)
    v1 = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    v2 = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    labels, index = torch.arange(n), torch.arange(n) + 100
    for seed, epoch, step, rank in [(0, 0, 0, 0), (5, 2, 3, 1), (2 ** 40 + 3, 7, 11, 2)]:
        out = {}
        for route in ("torch", "numba", "auto"):
            st = MixStage(MEAN, STD, mixer=MixMask(kind=kind, grid=4, ratio=0.5, per_sample=per_sample), seed=seed,
                          rank=rank, world=world, route=route)
            out[route] = st(v1, v2, labels, index, epoch, step)
        want = kernels.sample_masks(kind, n if per_sample else 1, 4, 0.5, seed, epoch, step * world + rank)
        ref = out["numba"]
        assert torch.equal(ref.mask, torch.from_numpy(want))
        for route in ("torch", "auto"):
            b = out[route]
            assert b.mask.dtype == torch.uint8 and torch.equal(b.mask, ref.mask), (route, seed)
            assert torch.equal(b.perm, ref.perm) and torch.equal(b.lam, ref.lam)
            for x, y in ((b.x1, ref.x1), (b.x2, ref.x2), (b.mixed, ref.mixed)):
                assert x.dtype == y.dtype and torch.equal(x, y), (route, seed)
