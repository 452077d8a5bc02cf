"""The Batch contract: what every loader backend hands the trainer (docs/methods.md §1, §7).

The mixing method (mixmask/mixing) decides what the views hold; the frameworks read the fields below
and never a method name:
- x1 is the query view AS THE METHOD MADE IT: clean for MixMask and Un-Mix, erased (noise-filled cells,
  high-pass filtered) for MSCN and saliency erase masking, which train on the masked view itself;
- each entry of ``mixes`` is one extra view credited by area to its sources (MixMask: one; Un-Mix +
  MixMask: two); an erased extra view has perm None and lam 1;
- hard_negative is an extra negative per sample for the frameworks that have negatives;
- keep lists the patches each sample's x1 keeps under masked image modelling (CMAE, docs/methods.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mixed:
    """One mixed view.

    x:      (N, 3, H, W) the view, normalised, training dtype, channels_last memory; a new tensor.
    perm:   (N,) int64, perm[j] = index of the image that fills x[j] where it is not x1[j];
            None = no partner (all of x[j] is credited to sample j).
    lam:    (N,) float32, realised fraction of x[j] that comes from sample j.
    mask:   the method's masks, for logging ((1 or N, g, g) uint8 grid masks for MixMask); may be None.
    method: the name of the method that made it (logging only).
    """

    x: torch.Tensor
    perm: torch.Tensor | None
    lam: torch.Tensor
    mask: torch.Tensor | None = None
    method: str = ""


@dataclass
class Batch:
    """One per-process training batch, already on the training device.

    x1, x2:  (N, 3, H, W) the two views, normalised, training dtype, channels_last memory; x2 is None
             from one-view loaders (views=1: supervised fine-tuning and augmented linear probes).
    labels:  (N,) int64, for monitors only (never used by the SSL loss).
    index:   (N,) int64 dataset indices of the samples (for exactness tests and debugging).
    mixes:   the mixed views (empty = masking off): see Mixed.
    hard_negative: (N, 3, H, W) a masked copy of x2[j], the extra negative of sample j; None = none.
    keep:    (N, K) int64 on the device, ascending: the patch indices of x1[j] its encoder sees (token
             masking, kernels/tokens.py); None = no token masking.
    """

    x1: torch.Tensor
    x2: torch.Tensor | None
    labels: torch.Tensor
    index: torch.Tensor | None = None
    mixes: tuple[Mixed, ...] = ()
    hard_negative: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.x1.shape[0]

    # Shorthands for batches with at most one mixed view (MixMask alone), None without one.
    @property
    def mixed(self) -> torch.Tensor | None:
        return self.mixes[0].x if self.mixes else None

    @property
    def perm(self) -> torch.Tensor | None:
        return self.mixes[0].perm if self.mixes else None

    @property
    def lam(self) -> torch.Tensor | None:
        return self.mixes[0].lam if self.mixes else None

    @property
    def mask(self) -> torch.Tensor | None:
        return self.mixes[0].mask if self.mixes else None
