"""Cosine losses of the non-contrastive frameworks (docs/methods.md §4.3-4.4).

BYOL (Grill et al. 2020, arXiv 2006.07733):   l(p, z) = || p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)
SimSiam (Chen & He 2021, arXiv 2011.10566):  D(p, z) = -cos(p, stopgrad(z))
The target z carries no gradient in either (BYOL's comes from the EMA network; SimSiam detaches it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixmask.losses.precision import float32


@float32
def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss per sample.  p, z: (N, D) -> (N,) float32"""
    return 2.0 - 2.0 * F.cosine_similarity(p, z.detach(), dim=1)


@float32
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D per sample.  p, z: (N, D) -> (N,) float32"""
    return -F.cosine_similarity(p, z.detach(), dim=1)
