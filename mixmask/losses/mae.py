"""Masked image modelling losses (MAE: He et al. 2021, arXiv 2111.06377; CMAE: arXiv 2205.10546;
docs/methods.md §8).

Reconstruction with normalised-pixel targets, on the masked patches only:

    t_l = (x_l - mean(x_l)) / sqrt(var(x_l) + 1e-6)      per patch l (norm_pix; var unbiased, as MAE's code)
    L_j = sum_l m_jl mean_d (pred_jld - t_jld)^2 / sum_l m_jl        m_jl = 1 where patch l was masked

Position prediction: cross-entropy of each visible token's logits over the L patch indices against
its true index, averaged over the K visible tokens of the sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixmask.losses.precision import float32


@float32
def masked_mse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """pred, target (N, L, P) patches; masked (N, L) bool (True = dropped) -> (N,) float32"""
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    err = (pred - target).pow(2).mean(-1)  # (N, L)
    m = masked.float()
    return (err * m).sum(1) / m.sum(1).clamp_min(1.0)


@float32
def position_ce(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """logits (N, K, L) over patch indices, index (N, K) int64 true patch indices -> (N,) float32"""
    n, k, L = logits.shape
    return F.cross_entropy(logits.reshape(n * k, L), index.reshape(-1), reduction="none").view(n, k).mean(1)
