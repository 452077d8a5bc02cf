"""The on-device end of every backend: uint8 NHWC views -> Batch (normalise, layout, the mixing method).

Every loader backend (loaders/) calls the stage it is given, once per batch, with the batch's step:

    batch = stage(v1, v2, labels, index, epoch, step)

Random draws are keyed by (seed, epoch, batch_index = step * world + rank, sample index) (kernels/rng.py
Philox streams), so a run is reproducible, resumes exactly, and every route trains on the same masks.
The route only picks who does the work: "auto"/"numba" our Numba kernels (CPU, or CUDA on a GPU),
"torch" the plain-numpy references of the samplers and float kernels with torch's normalise/select
(mixmask/fused.py). mixer=None: no mixing, the two normalised views only.
"""

from __future__ import annotations

import torch

from mixmask.batch import Batch
from mixmask.fused import Route
from mixmask.mixing.base import Keys, Mixer, Pixels


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
    ):
        self.px = Pixels(mean, std, dtype, channels_last, route)
        self.mixer, self.seed, self.rank, self.world = mixer, seed, rank, world

    def keys(self, epoch: int, step: int) -> Keys:
        return Keys(self.seed, epoch, step * self.world + self.rank)  # batch_index unique per (step, rank)

    def __call__(
        self,
        v1: torch.Tensor,  # (N, H, W, 3) uint8 on the device
        v2: torch.Tensor,  # (N, H, W, 3) uint8 on the device
        labels: torch.Tensor,  # (N,)
        index: torch.Tensor | None,  # (N,)
        epoch: int,
        step: int,
    ) -> Batch:
        if self.mixer is None:
            x1, x2, _ = self.px.mix(v1, v2, None, None)
            return Batch(x1, x2, labels, index)
        views = self.mixer(v1, v2, self.keys(epoch, step), self.px)
        return Batch(views.x1, views.x2, labels, index, views.mixes, views.hard_negative)

    def normalize(self, v: torch.Tensor) -> torch.Tensor:
        """One uint8 view (N, H, W, 3) -> normalised (N, 3, H, W), no mixing."""
        return self.px.normalize(v)
