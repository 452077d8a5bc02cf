"""The Batch contract: what every loader backend hands the trainer (docs/methods.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One per-process training batch, already on the training device.

    x1, x2:  (N, 3, H, W) the two views, normalised, training dtype, channels_last memory.
    mixed:   (N, 3, H, W) the MixMask view of x1, a new tensor (x1 stays clean); None = masking off.
    perm:    (N,) int64, perm[j] = index of the image that fills mixed[j].
    lam:     (N,) float32, realised fraction of mixed[j] that comes from x1[j].
    labels:  (N,) int64, for monitors only (never used by the SSL loss).
    mask:    (1 or N, g, g) uint8 grid masks (1 = x1), for logging; None when masking is off.
    index:   (N,) int64 dataset indices of the samples (for exactness tests and debugging).
    """

    x1: torch.Tensor
    x2: torch.Tensor
    mixed: torch.Tensor | None
    perm: torch.Tensor | None
    lam: torch.Tensor | None
    labels: torch.Tensor
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.x1.shape[0]
