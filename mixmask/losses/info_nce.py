"""MoCo's InfoNCE against a queue of negatives (He et al. 2020, arXiv 1911.05722; docs/methods.md §4.1).

For an L2-normalised query q, its positive key k and the queue {n_1..n_K}:

    l(q, k) = -log( exp(q.k / T) / (exp(q.k / T) + sum_i exp(q.n_i / T)) )

With a hard negative h (saliency-guided masking, Chin et al. arXiv 2309.12757; docs/methods.md §7), one
more term in the denominator, with weight alpha (its logit shifted by log alpha):

    l(q, k; h) = -log( exp(q.k / T) / (exp(q.k / T) + sum_i exp(q.n_i / T) + alpha exp(q.h / T)) )
"""

from __future__ import annotations

import math

import torch

from mixmask.losses.precision import float32


@float32
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float, hard: torch.Tensor | None = None,
             alpha: float = 1.0) -> torch.Tensor:
    """Per-sample InfoNCE.  q, k: (N, D) normalised; queue: (D, K); hard: (N, D) normalised -> (N,) float32"""
    neg_lse = torch.logsumexp(q @ queue / t, dim=1)  # (N,)
    if hard is not None:
        neg_lse = torch.logaddexp(neg_lse, (q * hard).sum(dim=1) / t + math.log(alpha))
    pos = (q * k).sum(dim=1) / t  # (N,)
    return torch.logaddexp(pos, neg_lse) - pos  # -log softmax of the positive


@float32
def info_nce_batch(q: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """InfoNCE against a batch of keys (MoCo v3 form, Chen et al. 2021, arXiv 2104.02057): the positive of
    q_j is keys[labels_j], every other key is a negative.
    q (N, D) and keys (M, D) normalised, labels (N,) int64 -> (N,) float32"""
    return torch.nn.functional.cross_entropy(q @ keys.T / t, labels, reduction="none")
