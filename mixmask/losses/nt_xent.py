"""SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709; docs/methods.md §4.2).

The 2N clean views of the global batch B = {z1_a} u {z2_a} (gathered across processes, with gradient);
for a local anchor u with positive v (its other view), similarities s = cos / T:

    l(u) = -log( exp(s(u, v)) / sum_{a in B, a != u} exp(s(u, a)) )

Per local sample j: (l(z1_j) + l(z2_j)) / 2. ``offset`` = this process's first row in the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixmask.losses.precision import float32


@float32
def nt_xent(
    z1: torch.Tensor,  # (N, D) local view-1 projections
    z2: torch.Tensor,  # (N, D) local view-2 projections
    z1_all: torch.Tensor,  # (M, D) view-1 projections of the global batch (M = W N), local rows at offset
    z2_all: torch.Tensor,  # (M, D)
    offset: int,
    t: float,
) -> torch.Tensor:
    """Per-sample NT-Xent.  -> (N,) float32"""
    n, m = z1.shape[0], z1_all.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    bank = F.normalize(torch.cat([z1_all, z2_all]), dim=1)  # (2M, D)
    logits = anchors @ bank.T / t  # (2N, 2M)
    local = offset + torch.arange(n, device=z1.device)  # (N,) rows of the local samples in z1_all
    own = torch.cat([local, local + m])  # (2N,) each anchor's own column
    positive = torch.cat([local + m, local])  # (2N,) its other view's column
    logits[torch.arange(2 * n, device=z1.device), own] = float("-inf")  # no self-similarity
    loss = F.cross_entropy(logits, positive, reduction="none")  # (2N,)
    return 0.5 * (loss[:n] + loss[n:])
