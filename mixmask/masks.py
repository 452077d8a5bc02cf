"""MixMask partners, upsampling, realised lam and mixing, in torch (the reference and fallback route).

MixMask (Vishniakov, Xing, Shen; arXiv 2210.11456), docs/methods.md §2:

    G in {0,1}^(g x g),  M = nearest-upsample(G) to H x W,
    x~_j = M * x1_j + (1 - M) * x1_perm[j],      lam_j = mean(M_j)   (realised, never nominal)

1 = the pixel stays from x1_j, 0 = it is filled from the partner x1_perm[j]. The nearest upsampling is
defined by integer cell indices ``row(y) = (y * g) // H`` and ``col(x) = (x * g) // W``, so cells need
not divide the image and every route (torch, Numba CPU, CUDA) computes the same mask.

The masks themselves (docs/methods.md §2: ``block``, BEiT-style, and ``discrete``) are drawn by the
counter-based Philox samplers in kernels/masks.py (``kernels.sample_masks`` and its plain-numpy twin
``kernels.masks.sample_masks_reference``, the same bits), on every route; see mixmask/mixing/stage.py.
"""

from __future__ import annotations

from typing import Literal

import torch

MaskKind = Literal["block", "discrete"]
Partner = Literal["auto", "reverse", "roll"]


def partner_permutation(n: int, how: Partner = "auto", device: torch.device | str = "cpu") -> torch.Tensor:
    """perm[j] = index of the image that fills mixed[j].  # (N,) int64

    reverse: perm[j] = N-1-j (the paper); for odd N the middle image is its own partner.
    roll:    perm[j] = (j+1) mod N, a derangement for every N >= 2.
    auto:    reverse for even N, roll for odd N.
    """
    if how == "auto":
        how = "reverse" if n % 2 == 0 else "roll"
    idx = torch.arange(n, device=device)
    if how == "reverse":
        return idx.flip(0)
    if how == "roll":
        return idx.roll(-1)
    raise ValueError(f"unknown partner rule {how!r}")


def cell_index(size: int, g: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cell of every pixel along one axis: (i * g) // size.  # (size,) int64"""
    return torch.arange(size, device=device) * g // size


def upsample(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest upsampling with integer cell indices.  (M, g, g) -> (M, H, W)"""
    gh, gw = masks.shape[-2:]
    rows = cell_index(h, gh, masks.device)
    cols = cell_index(w, gw, masks.device)
    return masks[:, rows][:, :, cols]


def realised_lam(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fraction of the H x W pixels kept from x1, per mask, computed from cell row/col counts.

    (M, g, g) -> (M,) float32. Exact: sum_{a,b} G[a,b] * rows_in_cell[a] * cols_in_cell[b] / (H W).
    """
    gh, gw = masks.shape[-2:]
    rcount = torch.bincount(cell_index(h, gh), minlength=gh).to(torch.float64)  # (gh,)
    ccount = torch.bincount(cell_index(w, gw), minlength=gw).to(torch.float64)  # (gw,)
    kept = torch.einsum("mab,a,b->m", masks.cpu().to(torch.float64), rcount, ccount)
    return (kept / (h * w)).to(torch.float32)


def mix(x1: torch.Tensor, masks: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x~_j = M_j * x1_j + (1 - M_j) * x1_perm[j], a NEW tensor (x1 is untouched).

    x1: (N, C, H, W) any dtype/memory format; masks: (1 or N, g, g); perm: (N,).
    Binary masks: a select, exact in any dtype (uint8 included).
    """
    n, _, h, w = x1.shape
    keep = upsample(masks.to(x1.device), h, w).bool()[:, None]  # (1|N, 1, H, W)
    return torch.where(keep, x1, x1[perm.to(x1.device)])
