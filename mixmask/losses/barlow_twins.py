"""Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, arXiv 2103.03230; docs/methods.md §4.5).

With each embedding dimension standardised over the batch (BatchNorm without affine: biased variance,
eps 1e-5), the cross-correlation of two batches of embeddings and the loss are

    C = (1/N) std(z_a)^T std(z_b)                      (D, D)
    L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2

It is a batch-level loss: z_a and z_b are the GLOBAL batch (gathered with gradient by the caller).
"""

from __future__ import annotations

import torch

from mixmask.losses.precision import float32


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension standardisation over the batch, as BatchNorm1d(affine=False) in training.  (N, D)"""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


@float32
def barlow_twins(za: torch.Tensor, zb: torch.Tensor, lambd: float) -> torch.Tensor:
    """Scalar Barlow Twins loss.  za, zb: (N, D)"""
    c = standardize(za).T @ standardize(zb) / za.shape[0]  # (D, D)
    diag = torch.diagonal(c)  # (D,)
    return (1.0 - diag).pow(2).sum() + lambd * (c.pow(2).sum() - diag.pow(2).sum())
