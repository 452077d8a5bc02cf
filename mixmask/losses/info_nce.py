"""MoCo's InfoNCE against a queue of negatives (He et al. 2020, arXiv 1911.05722; docs/methods.md §4.1).

For an L2-normalised query q, its positive key k and the queue {n_1..n_K}:

    l(q, k) = -log( exp(q.k / T) / (exp(q.k / T) + sum_i exp(q.n_i / T)) )
"""

from __future__ import annotations

import torch

from mixmask.losses.precision import float32


@float32
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """Per-sample InfoNCE.  q, k: (N, D) normalised; queue: (D, K) -> (N,) float32"""
    neg_lse = torch.logsumexp(q @ queue / t, dim=1)  # (N,)
    pos = (q * k).sum(dim=1) / t  # (N,)
    return torch.logaddexp(pos, neg_lse) - pos  # -log softmax of the positive
