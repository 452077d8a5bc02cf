"""Mask samplers, partners, upsampling, realised lam and mixing (mixmask/masks.py, mixmask/fused.py)."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixmask import masks as mk


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


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
    m = mk.sample_masks(kind, 5, g, 0.5, gen(g))
    lam = mk.realised_lam(m, h, w)
    for j in range(5):
        ref = full_mask_loops(m[j].numpy(), h, w)
        assert lam[j].item() == pytest.approx(ref.mean(), abs=1e-6)
        assert torch.equal(mk.upsample(m[j : j + 1], h, w)[0], torch.from_numpy(ref))


def test_upsample_matches_interpolate_when_cells_divide():
    m = mk.sample_masks("discrete", 3, 8, 0.5, gen())
    ref = F.interpolate(m[:, None].float(), size=(224, 224), mode="nearest")[:, 0].to(torch.uint8)
    assert torch.equal(mk.upsample(m, 224, 224), ref)


def test_block_masks_hit_target_where_they_can():
    g, r = 8, 0.5
    target = int(r * g * g)
    m = mk.sample_masks("block", 200, g, r, gen(1))
    masked = (m == 0).sum(dim=(1, 2))
    assert (masked <= target).all()
    assert (masked > 0).all()
    # BEiT's generator only stops early when no rectangle fits: at g=8, r=0.5 nearly always full.
    assert (masked == target).float().mean() > 0.8


def test_block_masks_are_blocky():
    """Masked cells come in rectangles: most masked cells have a masked 4-neighbour."""
    m = mk.sample_masks("block", 100, 8, 0.5, gen(2)) == 0
    pad = F.pad(m.float()[:, None], (1, 1, 1, 1))[:, 0]
    nbr = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    assert ((nbr > 0) & m).sum() / m.sum() > 0.95


def test_block_small_grid_terminates_and_may_underfill():
    m = mk.sample_masks("block", 300, 4, 0.5, gen(3))
    masked = (m == 0).sum(dim=(1, 2))
    assert (masked <= 8).all()
    lam = mk.realised_lam(m, 32, 32)
    assert torch.allclose(lam, 1 - masked.float() / 16)


@pytest.mark.parametrize("g,r", [(2, 0.9), (2, 0.1), (3, 0.5), (8, 0.5)])
def test_discrete_never_all_zero_or_all_one(g, r):
    m = mk.sample_masks("discrete", 500, g, r, gen(4))
    s = m.sum(dim=(1, 2))
    assert ((s > 0) & (s < g * g)).all()


def test_discrete_ratio_statistics():
    m = mk.sample_masks("discrete", 2000, 8, 0.3, gen(5))
    assert (1 - m.float().mean()).item() == pytest.approx(0.3, abs=0.01)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        mk.sample_masks("block", 1, 1, 0.5, gen())
    with pytest.raises(ValueError):
        mk.sample_masks("discrete", 1, 4, 1.0, gen())


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
    m = mk.sample_masks("discrete", n if per_sample else 1, 4, 0.5, gen(6))
    perm = mk.partner_permutation(n, "roll")
    mixed = mk.mix(x1, m, perm)
    assert torch.equal(x1, keep)  # x1 untouched
    assert mixed.data_ptr() != x1.data_ptr()
    for j in range(n):
        ref = full_mask_loops(m[j if per_sample else 0].numpy(), h, w)
        expect = np.where(ref == 1, j, perm[j].item())
        assert np.array_equal(mixed[j, 0].numpy(), expect)
        assert torch.equal(mixed[j, 0], mixed[j, 2])  # same mask on every channel
