"""The on-device end of every backend: uint8 NHWC views -> Batch (normalise, layout, the mixing method).

Every loader backend (loaders/) calls the stage it is given, once per batch, with the batch's step:

    batch = stage(v1, v2, labels, index, epoch, step)

Random draws are keyed by (seed, epoch, batch_index = step * world + rank, sample index) (kernels/rng.py
Philox streams), so a run is reproducible, resumes exactly, and every route trains on the same masks.
The route only picks who does the work: "auto"/"numba" our Numba kernels (CPU, or CUDA on a GPU),
"torch" the plain-numpy references of the samplers and float kernels with torch's normalise/select
(mixmask/fused.py). mixer=None: no mixing, the two normalised views only. One-view loaders (supervised
fine-tuning, augmented linear probes) pass v2=None: x1 normalised, x2 None (no mixer, no tokens).

tokens: a TokenMasking (masked image modelling, CMAE) adds ``batch.keep``, the kept patches of x1 per
sample, drawn on the host from the same keys (kernels/tokens.py) and moved to the device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels.tokens import keep_tokens, kept_count
from mixmask.batch import Batch
from mixmask.fused import Route
from mixmask.mixing.base import Keys, Mixer, Pixels


@dataclass(frozen=True)
class TokenMasking:
    """Random patch masking of x1 at ratio r on a grid x grid patch grid (MAE's random masking)."""

    grid: int  # image_size / patch_size
    ratio: float  # r: the fraction of patches dropped

    @property
    def kept(self) -> int:
        return kept_count(self.grid * self.grid, self.ratio)

    def __call__(self, n: int, keys: Keys, device) -> torch.Tensor:  # -> (n, K) int64 on the device
        keep = keep_tokens(n, self.grid * self.grid, self.kept, keys.seed, keys.epoch, keys.batch_index)
        return torch.from_numpy(keep).to(device, non_blocking=True)


class MixStage:
    def __init__(
        self,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        mixer: Mixer | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        route: Route = "auto",
        tokens: TokenMasking | None = None,
    ):
        self.px = Pixels(mean, std, dtype, channels_last, route)
        self.mixer, self.seed, self.rank, self.world, self.tokens = mixer, seed, rank, world, tokens

    def keys(self, epoch: int, step: int) -> Keys:
        return Keys(self.seed, epoch, step * self.world + self.rank)  # batch_index unique per (step, rank)

    def __call__(
        self,
        v1: torch.Tensor,  # (N, H, W, 3) uint8 on the device
        v2: torch.Tensor | None,  # (N, H, W, 3) uint8 on the device; None from a one-view loader
        labels: torch.Tensor,  # (N,)
        index: torch.Tensor | None,  # (N,)
        epoch: int,
        step: int,
    ) -> Batch:
        if v2 is None:
            if self.mixer is not None or self.tokens is not None:
                raise ValueError("a one-view batch (v2=None) takes no mixer and no token masking")
            return Batch(self.px.normalize(v1), None, labels, index)
        keys = self.keys(epoch, step)
        if self.mixer is None:
            x1, x2, _ = self.px.mix(v1, v2, None, None)
            batch = Batch(x1, x2, labels, index)
        else:
            views = self.mixer(v1, v2, keys, self.px)
            batch = Batch(views.x1, views.x2, labels, index, views.mixes, views.hard_negative)
        if self.tokens is not None:
            batch = replace(batch, keep=self.tokens(v1.shape[0], keys, v1.device))
        return batch

    def normalize(self, v: torch.Tensor) -> torch.Tensor:
        """One uint8 view (N, H, W, 3) -> normalised (N, 3, H, W), no mixing."""
        return self.px.normalize(v)
