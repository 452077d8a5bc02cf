"""MSCN-style erase masking (Jing, Zhu, LeCun, arXiv 2206.07700; the recipe of Chin et al.'s
re-implementation, arXiv 2309.12757). docs/methods.md §7.2.

Both views are high-pass filtered after normalisation, x_hp = x - GaussianBlur(x; 11, sigma 5); the
query view x1 is then masked and REPLACES the clean one (the framework trains on it, no extra view):
per sample, with probability focal_p focal masking (keep a random window of focal_size of each side,
fill the rest), otherwise a grid of g x g cells (g = 7 at 224 px: 32-px cells aligned to the ResNet
stride) with r ~ U(ratio) of the cells masked, the same cells in every channel with probability
spatial_p, else each channel its own cells. Masked elements are filled with N(0, noise_std^2) noise in
normalised units (a fresh draw per element, kernels/fill.py), or, as alternatives, the sample's
per-channel mean or a heavy blur of the view. Cells: kernels/cells.py mode "uniform".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from kernels.fill import filled_reference, gaussian_taps
from kernels.rng import STREAMS
from mixmask.mixing.base import Keys, Mixer, Pixels, Views, full_size
from mixmask.resolution import grid_at


@dataclass
class MSCNConfig:
    high_pass: bool = True  # filter both views: x - GaussianBlur(x)
    hp_kernel: int = 11  # Gaussian kernel size of the high-pass filter (odd)
    hp_sigma: float = 5.0  # its sigma in pixels
    grid: int = 7  # g x g cells (7 at 224 px: the ResNet stride; 4 at the demo's 32 px)
    ratio: tuple[float, float] = (0.05, 0.25)  # r ~ U(lo, hi): fraction of cells masked
    spatial_p: float = 0.3  # probability that all channels share the cells (else channel-wise)
    focal_p: float = 0.2  # probability of focal masking instead of cells
    focal_size: float = 200 / 224  # side of the kept focal window, as a fraction of the image side
    fill: Literal["noise", "mean", "blur"] = "noise"  # what masked elements become
    noise_std: float = 0.18  # std of the noise fill, normalised units

    def problems(self) -> list[str]:
        lo, hi = self.ratio
        checks = [(self.hp_kernel >= 1 and self.hp_kernel % 2 == 1, "hp_kernel must be odd and >= 1"),
                  (self.hp_sigma > 0, "hp_sigma must be > 0"), (self.grid >= 1, "grid must be >= 1"),
                  (0 <= lo <= hi <= 1, "ratio must be [lo, hi] with 0 <= lo <= hi <= 1"),
                  (0 <= self.spatial_p <= 1, "spatial_p must be in [0, 1]"), (0 <= self.focal_p <= 1, "focal_p must be in [0, 1]"),
                  (0 < self.focal_size <= 1, "focal_size must be in (0, 1]"), (self.noise_std >= 0, "noise_std must be >= 0")]
        return [m for ok, m in checks if not ok]


def erase_(x: torch.Tensor, masks: np.ndarray, boxes: np.ndarray, cfg: MSCNConfig, std: float, keys: Keys,
           stream: int, px: Pixels) -> torch.Tensor:
    """Fill the masked elements of x (N, C, H, W) float32 in place with cfg.fill (noise of ``std``)."""
    if cfg.fill == "noise":
        return px.noise_fill_(x, masks, boxes, std, keys, stream)
    n, c, h, w = x.shape
    where = torch.from_numpy(filled_reference(masks, boxes, c, h, w)).to(x.device)  # (N, C, H, W) bool
    if cfg.fill == "mean":
        source = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:  # a heavy blur: the Gaussian of the high-pass filter, applied as a depthwise convolution
        k = cfg.hp_kernel
        taps = torch.from_numpy(gaussian_taps(k, cfg.hp_sigma)).to(x.device)
        weight = (taps[:, None] * taps[None, :]).expand(c, 1, k, k)
        source = F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), weight, groups=c)
    x.copy_(torch.where(where, source, x))
    return x


class MSCN(Mixer):
    name = "mscn"
    sections = ("mscn",)
    grids = ("mscn.grid",)

    def __init__(self, cfg: MSCNConfig = MSCNConfig(), full_size: int = 0):
        self.cfg = cfg
        self.full_size = full_size  # progressive resolution: the side cfg.grid is given at (0: g at every side)

    @classmethod
    def from_config(cls, cfg) -> MSCN:
        return cls(cfg.mscn, full_size(cfg))

    def grid_for(self, v: torch.Tensor) -> int:
        """Cells a side for the views v (N, H, W, 3): cfg.grid, or under progressive resolution H / cell."""
        return grid_at(self.cfg.grid, self.full_size, v.shape[1])

    def filtered_views(self, v1, v2, px: Pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views normalised in float32 and, when asked, high-pass filtered."""
        x1, x2 = px.float_views(v1, v2)
        if self.cfg.high_pass:
            x1 = px.high_pass(x1, self.cfg.hp_kernel, self.cfg.hp_sigma)
            x2 = px.high_pass(x2, self.cfg.hp_kernel, self.cfg.hp_sigma)
        return x1, x2

    def query_masks(self, fg, mode: str, n: int, h: int, w: int, keys: Keys, px: Pixels, cap: float = 1.0):
        c = self.cfg
        return px.cell_masks(fg, n, 3, grid_at(c.grid, self.full_size, h), c.ratio[0], c.ratio[1], c.spatial_p, c.focal_p, c.focal_size, cap, mode,
                             h, w, keys.seed, keys.epoch, keys.batch_index, STREAMS["cells"])

    def __call__(self, v1, v2, keys: Keys, px: Pixels) -> Views:
        n, h, w, _ = v1.shape
        x1, x2 = self.filtered_views(v1, v2, px)
        masks, boxes = self.query_masks(None, "uniform", n, h, w, keys, px)
        erase_(x1, masks, boxes, self.cfg, self.cfg.noise_std, keys, STREAMS["noise"], px)
        return Views(px.finish(x1), px.finish(x2))
