"""Saliency-guided masking with hard negatives (Chin et al., arXiv 2309.12757, WACV 2024) and the
saliency-guided MixMask (ours). docs/methods.md §7.3-7.4.

Saliency map S_j of a view (N, h, w), by ``saliency.source``:
- "spectral" (default, no labels, no network): the spectral residual (Hou & Zhang, CVPR 2007), computed on
  the device from the uint8 view: g = grey level (downsampled to at most 64 px), F = FFT(g),
  R = log|F| - box3(log|F|), S = |IFFT(exp(R + i angle(F)))|^2 smoothed;
- "encoder" (no labels): the channel sum of the momentum/target encoder's last feature map on the
  normalised view (Framework.target_feature_map, refreshed every step: train.py hands it to the mixer);
- "file" (the paper's, for fidelity: supervised weights leak labels): the channel sum of the last feature
  map of a torchvision ResNet (``saliency.arch``) loaded from the local file ``saliency.weights`` (a
  state dict, .pth or .safetensors; never downloaded), frozen, in eval mode.
A_j = the mean of S_j over each cell of the g x g grid (the masks' cells: cell_row(y) = (y g) // h);
foreground cells A >= mean(A) - threshold std(A) per sample (kernels/cells.py foreground_cells).

"saliency" (erase, the paper): as MSCN (mixmask/mixing/mscn.py: high-pass, focal, channel-wise, noise
0.18), but the query's cells are spread evenly over foreground and background (kernels/cells.py mode
"balanced": the masked fraction is the same in both); the hard negative is a copy of the KEY view x2
with r ~ U(hard_ratio) of ITS foreground cells filled with noise of std hard_noise_std, encoded by the
key encoder and appended to the negatives with weight alpha (the framework's hard_alpha).

"saliency_mixmask" (ours, no paper has it): the query keeps its clean view; a MixMask view is added
whose masked cells are chosen the balanced way (n = int(r G) cells, r = mask.ratio, split between
foreground and background in proportion) and filled from the partner image (not noise), one mask
per sample, credited with the realised lam_j. It asks whether spreading the partner's content over
the object and its background helps MixMask the way it helps erasing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from kernels import cells as kc
from kernels.rng import STREAMS
from mixmask import masks as mk
from mixmask.mixing.base import Keys, Mixer, Pixels, Views
from mixmask.mixing.mixmask import MixMask
from mixmask.mixing.mscn import MSCN, erase_

SALIENCY_SIZE = 64  # the spectral residual is computed at most at this resolution (Hou & Zhang: 64 px)


@dataclass
class SaliencyConfig:
    source: Literal["spectral", "encoder", "file"] = "spectral"  # spectral residual | target encoder's map | a local supervised net
    weights: str = ""  # source=file: a torchvision ResNet state dict (.pth / .safetensors), read locally
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"  # source=file: its torchvision architecture
    threshold: float = 0.6  # foreground cells: A >= mean(A) - threshold std(A)
    cap: float = 0.55  # at most this fraction of all cells masked in the foreground
    hard_negative: bool = True  # append a masked copy of the key view as an extra negative
    hard_ratio: tuple[float, float] = (0.4, 0.7)  # fraction of its foreground cells masked
    hard_noise_std: float = 0.14  # noise std of the hard negative's masked cells (normalised units)

    def problems(self) -> list[str]:
        lo, hi = self.hard_ratio
        checks = [(self.threshold >= 0, "threshold must be >= 0"), (0 <= self.cap <= 1, "cap must be in [0, 1]"),
                  (0 <= lo <= hi <= 1, "hard_ratio must be [lo, hi] in [0, 1]"),
                  (self.hard_noise_std >= 0, "hard_noise_std must be >= 0"),
                  (self.source != "file" or bool(self.weights), "source=file needs weights (a local state-dict file)"),
                  (self.source != "file" or not self.weights or _is_file(self.weights),
                   f"weights: no such file {self.weights!r}")]
        return [m for ok, m in checks if not ok]


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long for the file system (is_file passes only "no such file" errors)
        return False


FeatureMap = Callable[[torch.Tensor], torch.Tensor]  # normalised (N, 3, H, W) float32 -> (N, C, h, w)


def file_network(path: str, arch: str) -> FeatureMap:
    """The last feature map of a torchvision ResNet with the weights of a local file, frozen, eval mode."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    net.load_state_dict(state)  # strict: a wrong file is an error, not a random network
    body = torch.nn.Sequential(*list(net.children())[:-2]).eval().requires_grad_(False)
    return body


class SaliencySource:
    """S_j of a uint8 view by cfg.source (module docstring); ``feature_map`` is set for "encoder"."""

    def __init__(self, cfg: SaliencyConfig):
        self.cfg = cfg
        self.feature_map: FeatureMap | None = file_network(cfg.weights, cfg.arch) if cfg.source == "file" else None

    @property
    def wants_encoder(self) -> bool:
        return self.cfg.source == "encoder"

    def __call__(self, v: torch.Tensor, px: Pixels) -> torch.Tensor:  # (N, H, W, 3) uint8 -> (N, h, w)
        if self.cfg.source == "spectral":
            return spectral_residual(v)
        if self.feature_map is None:
            raise RuntimeError("saliency.source=encoder: no encoder was handed to the mixer (train.py does it)")
        net = self.feature_map
        if isinstance(net, torch.nn.Module):
            net = net.to(v.device)
        with torch.no_grad():
            return net(px.normalize(v, torch.float32)).float().sum(dim=1)  # (N, h, w) channel sum

    def foreground(self, v: torch.Tensor, g: int, px: Pixels) -> np.ndarray:
        """Foreground cells of a view's saliency map.  (N, H, W, 3) uint8 -> (N, g*g) uint8 on the host"""
        return foreground(self(v, px), g, self.cfg.threshold)


def spectral_residual(v: torch.Tensor) -> torch.Tensor:
    """Spectral-residual saliency (Hou & Zhang 2007).  (N, H, W, 3) uint8 -> (N, h, w) float32, h <= 64"""
    g = v.float().mean(dim=-1)[:, None]  # (N, 1, H, W)
    if max(g.shape[-2:]) > SALIENCY_SIZE:
        g = F.interpolate(g, size=(SALIENCY_SIZE, SALIENCY_SIZE), mode="area")
    spec = torch.fft.fft2(g[:, 0])  # (N, h, w) complex
    log_amp = torch.log(spec.abs() + 1e-8)
    local = F.avg_pool2d(F.pad(log_amp[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    s = torch.fft.ifft2(torch.polar(torch.exp(log_amp - local), torch.angle(spec))).abs() ** 2  # (N, h, w)
    for _ in range(2):  # smoothing: two 3x3 box filters (~ a Gaussian of sigma 1.2 px at 64 px)
        s = F.avg_pool2d(F.pad(s[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    return s


def cell_means(s: torch.Tensor, g: int) -> torch.Tensor:
    """Mean of a map over the g x g cells (cell_row(y) = (y g) // h).  (N, h, w) -> (N, g*g)"""
    n, h, w = s.shape
    rows = F.one_hot(mk.cell_index(h, g, s.device), g).float()  # (h, g)
    cols = F.one_hot(mk.cell_index(w, g, s.device), g).float()  # (w, g)
    total = torch.einsum("nyx,ya,xb->nab", s, rows, cols)
    return (total / (rows.sum(0)[:, None] * cols.sum(0)[None, :])).reshape(n, g * g)


def foreground(s: torch.Tensor, g: int, threshold: float) -> np.ndarray:
    """Foreground cells of saliency maps.  (N, h, w) -> (N, g*g) uint8 on the host"""
    return kc.foreground_cells(cell_means(s, g).cpu().numpy(), threshold)


def hard_negative(x2f: torch.Tensor, fg: np.ndarray, cfg: SaliencyConfig, grid: int, keys: Keys,
                  px: Pixels) -> torch.Tensor:
    """A copy of the key view (float32, normalised) with r ~ U(hard_ratio) of its foreground cells fg noised."""
    n, _, h, w = x2f.shape
    masks, boxes = px.cell_masks(fg, n, 3, grid, cfg.hard_ratio[0], cfg.hard_ratio[1], 1.0, 0.0, 1.0, 1.0, "foreground",
                                 h, w, keys.seed, keys.epoch, keys.batch_index, STREAMS["hard_cells"])
    return px.finish(px.noise_fill_(x2f.clone(), masks, boxes, cfg.hard_noise_std, keys, STREAMS["hard_noise"]))


class Saliency(Mixer):
    name = "saliency"
    sections = ("mscn", "saliency")
    grids = ("mscn.grid",)

    def __init__(self, mscn: MSCN, cfg: SaliencyConfig = SaliencyConfig()):
        self.mscn, self.cfg, self.saliency = mscn, cfg, SaliencySource(cfg)
        self.hard_negatives = cfg.hard_negative

    @classmethod
    def from_config(cls, cfg) -> Saliency:
        return cls(MSCN.from_config(cfg), cfg.saliency)

    def __call__(self, v1, v2, keys: Keys, px: Pixels) -> Views:
        n, h, w, _ = v1.shape
        m, g = self.mscn.cfg, self.mscn.grid_for(v1)
        x1, x2 = self.mscn.filtered_views(v1, v2, px)
        fg = self.saliency.foreground(v1, g, px)
        masks, boxes = self.mscn.query_masks(fg, "balanced", n, h, w, keys, px, cap=self.cfg.cap)
        erase_(x1, masks, boxes, m, m.noise_std, keys, STREAMS["noise"], px)
        hard = None
        if self.cfg.hard_negative:
            hard = hard_negative(x2, self.saliency.foreground(v2, g, px), self.cfg, g, keys, px)
        return Views(px.finish(x1), px.finish(x2), (), hard)


class SaliencyMixMask(MixMask):
    """MixMask (its mixing, partner and lam) with the saliency-balanced per-sample masks of masks()."""

    name = "saliency_mixmask"
    sections = ("mask", "saliency")

    def __init__(self, mixmask: MixMask, cfg: SaliencyConfig = SaliencyConfig()):
        super().__init__(kind=mixmask.kind, grid=mixmask.grid, ratio=mixmask.ratio, per_sample=True,
                         partner=mixmask.partner, full_size=mixmask.full_size)
        self.cfg, self.saliency = cfg, SaliencySource(cfg)
        self.hard_negatives = cfg.hard_negative

    @classmethod
    def from_config(cls, cfg) -> SaliencyMixMask:
        return cls(MixMask.from_config(cfg), cfg.saliency)

    def masks(self, v1, keys: Keys, px: Pixels) -> torch.Tensor:
        """Balanced cells filled from the partner.  -> (N, g, g) uint8 on the host, 1 = keep x1"""
        n, h, w, _ = v1.shape
        g = self.grid_for(v1)
        fg = self.saliency.foreground(v1, g, px)
        masks, _ = px.cell_masks(fg, n, 1, g, self.ratio, self.ratio, 1.0, 0.0, 1.0, self.cfg.cap, "balanced",
                                 h, w, keys.seed, keys.epoch, keys.batch_index, STREAMS["cells"])
        return torch.from_numpy(masks[:, 0])

    def __call__(self, v1, v2, keys: Keys, px: Pixels) -> Views:
        views = super().__call__(v1, v2, keys, px)
        if self.cfg.hard_negative:
            g = self.grid_for(v2)
            views.hard_negative = hard_negative(px.normalize(v2, torch.float32), self.saliency.foreground(v2, g, px),
                                                self.cfg, g, keys, px)
        return views
