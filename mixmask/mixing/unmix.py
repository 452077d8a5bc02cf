"""Un-Mix (Shen et al., AAAI 2022, arXiv 2003.05438) and Un-Mix + MixMask (MixMask, arXiv 2210.11456
§"Un-Mix + MixMask"). docs/methods.md §7.1.

Per batch, from the batch stream (kernels/rng.py STREAMS["batch"], sample 0, call 0: u0..u3):
    lam ~ Beta(1, 1) = u0;  with probability mixup_p (u1 < mixup_p) global mixup, in float after
    normalisation:           x~_j = lam x1_j + (1 - lam) x1_perm[j]
    otherwise CutMix: a box of side ~sqrt(1 - lam) H x sqrt(1 - lam) W (Yun et al.'s rand_bbox: centre
    (floor(u2 H), floor(u3 W)), half-sides int(sqrt(1 - lam) H) // 2 and int(sqrt(1 - lam) W) // 2),
    clipped to the image, filled from x1_perm[j] in a COPY of x1 (uint8 select in the fused kernel),
    and lam RECOMPUTED from the clipped box: lam = 1 - box area / (H W).
perm: the batch reversed (Un-Mix), rolled by one for odd N. The loss credits x~ by lam like MixMask.

Un-Mix + MixMask: both mixed views at once (four forward passes with q and k); the MixMask view uses
a random permutation drawn from the batch stream (the reference code's choice), Un-Mix its reversal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels.rng import STREAM_SHIFT, STREAMS, uniform4
from mixmask import masks as mk
from mixmask.batch import Mixed
from mixmask.mixing.base import Keys, Mixer, Pixels, Views, mixed_view
from mixmask.mixing.mixmask import MixMask


@dataclass
class UnMixConfig:
    mixup_p: float = 0.5  # probability of global mixup per batch (else CutMix); the paper's run.sh: 0.5

    def problems(self) -> list[str]:
        return [] if 0.0 <= self.mixup_p <= 1.0 else ["mixup_p must be in [0, 1]"]


def draw(keys: Keys, mixup_p: float) -> tuple[float, bool, float, float]:
    """(lam, mixup?, u_row, u_col) of the batch (module docstring)."""
    u0, u1, u2, u3 = uniform4(np.uint64(keys.seed), keys.epoch, keys.batch_index, 0, STREAMS["batch"] << STREAM_SHIFT)
    return u0, u1 < mixup_p, u2, u3


def cutmix_box(lam: float, u_row: float, u_col: float, h: int, w: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the clipped CutMix box (Yun et al. 2019's rand_bbox with our uniforms)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = min(int(u_row * h), h - 1), min(int(u_col * w), w - 1)
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


class UnMix(Mixer):
    name = "unmix"
    sections = ("unmix",)

    def __init__(self, cfg: UnMixConfig = UnMixConfig()):
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg) -> UnMix:
        return cls(cfg.unmix)

    def plan(self, v1, keys: Keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(perm (N,), lam (N,) float32, CutMix box (1, H, W) uint8 on v1's device, or None for mixup)."""
        n, h, w, _ = v1.shape
        lam, mixup, u_row, u_col = draw(keys, self.cfg.mixup_p)
        perm = mk.partner_permutation(n, "auto", v1.device)
        if mixup:
            return perm, torch.full((n,), lam, dtype=torch.float32), None
        y0, y1, x0, x1 = cutmix_box(lam, u_row, u_col, h, w)
        box = torch.ones((1, h, w), dtype=torch.uint8)  # (1, H, W) pixel-resolution mask, 0 = from the partner
        box[:, y0:y1, x0:x1] = 0
        return perm, mk.realised_lam(box, h, w).expand(n), box.to(v1.device)

    def view(self, v1, x1f: torch.Tensor | None, keys: Keys, px: Pixels) -> Mixed:
        """The Un-Mix view of v1 (x1f: v1 normalised in float32 if at hand, for mixup)."""
        perm, lam, box = self.plan(v1, keys)
        if box is None:
            x = px.mixup(x1f if x1f is not None else px.normalize(v1, torch.float32), perm, lam)
            return mixed_view(px.finish(x), perm, lam, None, self.name)
        return mixed_view(px.mix(v1, v1, box, perm)[2], perm, lam, box, self.name)

    def __call__(self, v1, v2, keys: Keys, px: Pixels) -> Views:
        perm, lam, box = self.plan(v1, keys)
        if box is not None:  # CutMix: a uint8 select inside the one fused normalise pass
            x1, x2, mixed = px.mix(v1, v2, box, perm)
            return Views(x1, x2, (mixed_view(mixed, perm, lam, box, self.name),))
        x1, x2 = px.float_views(v1, v2)  # mixup: in float32, after normalisation
        return Views(px.finish(x1), px.finish(x2), (self.view(v1, x1, keys, px),))


class UnMixMixMask(Mixer):
    name = "unmix_mixmask"
    sections = ("unmix", "mask")
    grids = ("mask.grid",)

    def __init__(self, unmix: UnMix, mixmask: MixMask):
        self.unmix, self.mixmask = unmix, mixmask

    @classmethod
    def from_config(cls, cfg) -> UnMixMixMask:
        mm = MixMask.from_config(cfg)
        mm.partner = "random"
        return cls(UnMix.from_config(cfg), mm)

    def __call__(self, v1, v2, keys: Keys, px: Pixels) -> Views:
        views = self.mixmask(v1, v2, keys, px)
        x1f = views.x1 if views.x1.dtype == torch.float32 else None
        return Views(views.x1, views.x2, (*views.mixes, self.unmix.view(v1, x1f, keys, px)))
