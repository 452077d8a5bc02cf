"""The on-device end of every backend: uint8 NHWC views -> Batch (normalise, layout, MixMask).

Masks are always the kernels' counter-based Philox masks (kernels/masks.py), keyed by
(seed, epoch, batch_index = step * world + rank, sample index), so a run is reproducible, resumes
exactly, and every route trains on the same masks; one mask per batch (the paper) or one per sample.
The partner permutation is the same one the loss uses. The route only picks who does the work:
"numba" / "auto" draw with the compiled sampler (kernels.sample_masks) and use our fused normalise +
mix kernels when they exist for the device; "torch" draws with its plain-numpy twin
(kernels.masks.sample_masks_reference, the same bits) and normalises + mixes in torch.
"""

from __future__ import annotations

import torch

from kernels import masks as km
from mixmask import masks as mk
from mixmask.batch import Batch
from mixmask.fused import Route, normalize, normalize_and_mix


class MixStage:
    def __init__(
        self,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        enabled: bool = True,
        kind: mk.MaskKind = "block",
        grid: int = 8,
        ratio: float = 0.5,
        per_sample: bool = False,
        partner: mk.Partner = "auto",
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        route: Route = "auto",
    ):
        self.mean, self.std, self.dtype, self.channels_last = mean, std, dtype, channels_last
        self.enabled, self.kind, self.grid, self.ratio = enabled, kind, grid, ratio
        self.per_sample, self.partner, self.seed, self.rank, self.world = per_sample, partner, seed, rank, world
        self.route = route

    def masks_for(self, n: int, epoch: int, step: int) -> torch.Tensor:
        """The step's grid masks (the same on every route).  -> (N or 1, g, g) uint8 on the CPU"""
        count = n if self.per_sample else 1
        batch_index = step * self.world + self.rank  # unique per (step, rank)
        sample = km.sample_masks_reference if self.route == "torch" else km.sample_masks
        return torch.from_numpy(sample(self.kind, count, self.grid, self.ratio, self.seed, epoch, batch_index))

    def __call__(
        self,
        v1: torch.Tensor,  # (N, H, W, 3) uint8 on the device
        v2: torch.Tensor,  # (N, H, W, 3) uint8 on the device
        labels: torch.Tensor,  # (N,)
        index: torch.Tensor | None,  # (N,)
        epoch: int,
        step: int,
    ) -> Batch:
        n, h, w, _ = v1.shape
        masks = perm = lam = None
        if self.enabled:
            masks = self.masks_for(n, epoch, step)
            perm = mk.partner_permutation(n, self.partner, v1.device)
            lam = mk.realised_lam(masks, h, w).expand(n).contiguous().to(v1.device)  # (N,)
            masks = masks.to(v1.device)
        x1, x2, mixed = normalize_and_mix(
            v1, v2, masks, perm, self.mean, self.std, self.dtype, self.channels_last, self.route
        )
        return Batch(x1, x2, mixed, perm, lam, labels, masks, index)

    def normalize(self, v: torch.Tensor) -> torch.Tensor:
        """One uint8 view (N, H, W, 3) -> normalised (N, 3, H, W), no mixing."""
        return normalize(v, self.mean, self.std, self.dtype, self.channels_last, self.route)
