"""Per-sample MoCo v2 view parameters for the backends whose augmentation ops take their parameters
as inputs (DALI; FFCV next): the MoCo v2 recipe (docs/methods.md §6) / loaders.torchvision_backend.AugParams,
drawn by kernels/views.py (torchvision's RandomResizedCrop rule; every draw keyed by
(seed, epoch, index, view)), plus the colour map of kernels/color.py for the CPU view pipeline.
ContrastiveCrop (Peng et al., CVPR 2022): with per-sample boxes and alpha > 0 the crop offsets are
Beta(alpha, alpha) around each box (kernels/ccrop.py); alpha <= 0 is plain RandomResizedCrop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.color import colour_matrices
from kernels.views import draw_view_params
from loaders.torchvision_backend import AugParams


@dataclass
class ViewBatch:
    """Parameters of one view for a batch of N samples (arrays, one row per sample)."""

    roi: np.ndarray  # (N, 4) float32: y0, x0, y1, x1 as fractions of the image height / width
    flip: np.ndarray  # (N,) int32 in {0, 1}
    jitter_on: np.ndarray  # (N,) int32
    jitter: np.ndarray  # (N, 4) float32: brightness, contrast, saturation factors; hue in degrees
    gray: np.ndarray  # (N,) int32
    colour_on: np.ndarray  # (N,) int32: jitter_on or gray
    colour_m: np.ndarray  # (N, 3, 3) float32: saturation, hue and grayscale map (kernels/color.py)
    colour_cb: np.ndarray  # (N, 2) float32: (c * b, (1 - c) * b) of brightness b and contrast c
    blur_on: np.ndarray  # (N,) int32
    sigma: np.ndarray  # (N,) float32 (px)
    solarize: np.ndarray  # (N,) int32


def draw_views(aug: AugParams, seed: int, epoch: int, indices, sizes, view: int, colour: bool = True,
               boxes=None, alpha: float | None = None) -> ViewBatch:
    """View `view` (0 or 1) of each sample.  indices: (N,) dataset indices; sizes: (N, 2) (W, H) px.
    colour: also build the affine colour maps (the CPU pipeline's input; the GPU one uses the factors).
    boxes: (N, 4) (y0, x0, y1, x1) normalised ContrastiveCrop boxes, None = whole images; alpha: the
    Beta(alpha, alpha) parameter (None: aug.crop_alpha; <= 0: plain RandomResizedCrop)."""
    idx = np.ascontiguousarray(indices, np.int64)
    n = len(idx)
    alpha = float(aug.crop_alpha if alpha is None else alpha)
    if boxes is None:
        bx = np.zeros((n, 4), np.float32)  # (N, 4) whole images
        bx[:, 2:] = 1
    else:
        bx = np.ascontiguousarray(boxes, np.float32).reshape(n, 4)
    roi = np.empty((n, 4), np.float32)
    flip, jon, gray, bon, sol = (np.empty(n, np.int32) for _ in range(5))
    jit = np.empty((n, 4), np.float32)
    sigma = np.empty(n, np.float32)
    f64 = lambda *v: np.asarray(v, np.float64)  # noqa: E731
    draw_view_params(np.uint64(seed), epoch, view, idx, np.ascontiguousarray(sizes, np.int64).reshape(n, 2),
                     f64(*aug.crop_scale), f64(*aug.crop_ratio),
                     f64(aug.jitter_p, aug.gray_p, aug.blur_p, aug.solarize_p, aug.flip_p), f64(*aug.jitter),
                     f64(*aug.blur_sigma), bx, alpha, roi, flip, jon, jit, gray, bon, sigma, sol)
    cm = cb = None
    if colour:
        on = jon.astype(bool)
        b = np.where(on, jit[:, 0], 1).astype(np.float32)
        c = np.where(on, jit[:, 1], 1).astype(np.float32)
        cm = colour_matrices(np.where(on, jit[:, 2], 1), np.where(on, jit[:, 3], 0), gray.astype(bool))
        cb = np.stack([c * b, (1 - c) * b], 1).astype(np.float32)
    return ViewBatch(roi, flip, jon, jit, gray, jon | gray, cm, cb, bon, sigma, sol)
