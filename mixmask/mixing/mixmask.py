"""MixMask (Vishniakov, Xing, Shen; arXiv 2210.11456, BMVC 2024). docs/methods.md §2-3.

    G in {0,1}^(g x g) (block or discrete generator, kernels/masks.py),  M = nearest-upsample(G),
    x~_j = M * x1_j + (1 - M) * x1_perm[j],      lam_j = mean(M_j)   (realised)

One mask per batch (the paper) or per sample; the mix runs on uint8 pixels inside the fused
normalise kernel (binary masks commute with normalisation). x1 and x2 stay clean.
Options: the ``mask`` section (mixmask/config.py MaskConfig).
"""

from __future__ import annotations

import torch

from mixmask import masks as mk
from mixmask.mixing.base import Keys, Mixer, Pixels, Views, full_size, mixed_view, partner
from mixmask.resolution import grid_at


class MixMask(Mixer):
    name = "mixmask"
    sections = ("mask",)
    grids = ("mask.grid",)

    def __init__(self, *, kind: mk.MaskKind = "block", grid: int = 8, ratio: float = 0.5, per_sample: bool = False,
                 partner: str = "auto", full_size: int = 0):
        self.kind, self.grid, self.ratio, self.per_sample, self.partner = kind, grid, ratio, per_sample, partner
        self.full_size = full_size  # progressive resolution: the side `grid` is given at (0: g at every side)

    @classmethod
    def from_config(cls, cfg) -> MixMask:
        m = cfg.mask
        return cls(kind=m.kind, grid=m.grid, ratio=m.ratio, per_sample=m.per_sample, partner=m.partner,
                   full_size=full_size(cfg))

    def grid_for(self, v: torch.Tensor) -> int:
        """Cells a side for the views v (N, H, W, 3): self.grid, or under progressive resolution H / cell."""
        return grid_at(self.grid, self.full_size, v.shape[1])

    def masks(self, v1: torch.Tensor, keys: Keys, px: Pixels) -> torch.Tensor:
        """The step's grid masks (the same on every route).  -> (N or 1, g, g) uint8 on the CPU"""
        return px.sample_masks(self.kind, v1.shape[0] if self.per_sample else 1, self.grid_for(v1), self.ratio, keys.seed,
                               keys.epoch, keys.batch_index)

    def __call__(self, v1, v2, keys: Keys, px: Pixels) -> Views:
        n, h, w, _ = v1.shape
        masks = self.masks(v1, keys, px)
        perm = partner(n, self.partner, keys, v1.device)
        lam = mk.realised_lam(masks, h, w).expand(n)  # (N,)
        masks = masks.to(v1.device)
        x1, x2, mixed = px.mix(v1, v2, masks, perm)
        return Views(x1, x2, (mixed_view(mixed, perm, lam, masks, self.name),))
