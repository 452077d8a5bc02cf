"""InfoNCE and the MixMask loss (MixMask, arXiv 2210.11456, SPEC.md 1.6).

MoCo InfoNCE of a query q with positive key k and the queue {n_1..n_K} as negatives (all L2-normalised):

    l(q, k) = -log( exp(q.k / T) / (exp(q.k / T) + sum_i exp(q.n_i / T)) )

MixMask, in its general per-sample form for a partner permutation perm and realised lam_j:

    L = (1/N) sum_j [ l(q_j, k_j) + lam_j l(q~_j, k_j) + (1 - lam_j) l(q~_j, k_perm[j]) ]

The mixed view is credited to both of its sources by area. With the masking off, L = (1/N) sum_j l(q_j, k_j)
(plain MoCo v2). The pairwise form (query, positive target) is the MoCo v2 one; other Siamese frameworks
need it rewritten for their loss.
"""

from __future__ import annotations

import torch


def info_nce(q: torch.Tensor, k_pos: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """Per-sample InfoNCE.  q, k_pos: (N, D); queue: (D, K) -> (N,)"""
    return info_nce_multi(q, [k_pos], queue, t)[0]


def info_nce_multi(
    q: torch.Tensor, positives: list[torch.Tensor], queue: torch.Tensor, t: float
) -> list[torch.Tensor]:
    """l(q, p) for several positives p that share the same negatives (one queue matmul).

    q: (N, D); each p: (N, D); queue: (D, K) -> list of (N,)
    """
    q = q.float()
    neg = q @ queue.float() / t  # (N, K)
    neg_lse = torch.logsumexp(neg, dim=1)  # (N,)
    out = []
    for p in positives:
        pos = (q * p.float()).sum(dim=1) / t  # (N,)
        out.append(torch.logaddexp(pos, neg_lse) - pos)  # -log softmax of the positive
    return out


def mixmask_loss(
    q: torch.Tensor,  # (N, D) query of the clean view x1
    k: torch.Tensor,  # (N, D) key of view x2 (no gradient)
    queue: torch.Tensor,  # (D, K) negatives
    t: float,
    q_mix: torch.Tensor | None = None,  # (N, D) query of the mixed view, None = plain MoCo v2
    perm: torch.Tensor | None = None,  # (N,) partner of each mixed image
    lam: torch.Tensor | None = None,  # (N,) realised fraction from x1_j
) -> dict[str, torch.Tensor]:
    """Return {"loss", "loss_clean", "loss_mix"} (scalars; loss_mix only with a mixed view)."""
    clean = info_nce(q, k, queue, t)  # (N,)
    out = {"loss_clean": clean.mean()}
    if q_mix is None:
        out["loss"] = out["loss_clean"]
        return out
    own, other = info_nce_multi(q_mix, [k, k[perm]], queue, t)  # (N,), (N,)
    lam = lam.to(own.device, torch.float32)
    mixed = lam * own + (1.0 - lam) * other  # (N,)
    out["loss_mix"] = mixed.mean()
    out["loss"] = (clean + mixed).mean()
    return out
