"""The MixMask credit, written once (MixMask, arXiv 2210.11456; docs/methods.md §3).

For any pairwise loss l(z, t) and a mixed view whose pixels come from sample j (fraction lam_j) and its
partner perm[j] (fraction 1 - lam_j):

    L_mix_j = lam_j l(z~_j, t_j) + (1 - lam_j) l(z~_j, t_perm[j])          (per sample, (N,))

``target`` is anything indexed per sample along dim 0: embeddings (N, D), or class indices (N,) into a
logit matrix that ``z_mix`` already holds (SimCLR). Use the SAME perm that made the mixed view.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PairLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z (N, ...), t (N, ...)) -> (N,)


def area_credited(
    pair_loss: PairLoss,
    z_mix: torch.Tensor,  # (N, ...) the mixed view's output
    target: torch.Tensor,  # (N, ...) the clean targets of the samples
    perm: torch.Tensor | None,  # (N,) perm[j] = the image that fills mixed j; None = no partner
    lam: torch.Tensor,  # (N,) realised fraction of mixed j from sample j
) -> torch.Tensor:
    """lam * l(z~, t) + (1 - lam) * l(z~, t[perm]), per sample (l(z~, t) when perm is None).  -> (N,) float32"""
    lam = lam.to(z_mix.device, torch.float32)
    if perm is None:
        return pair_loss(z_mix, target).float()
    return lam * pair_loss(z_mix, target) + (1.0 - lam) * pair_loss(z_mix, target[perm.to(target.device)])
