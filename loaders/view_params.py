"""Per-sample MoCo v2 view parameters drawn in numpy, for the backends whose augmentation ops take
their parameters as inputs (DALI; FFCV next).

The recipe is SPEC.md 1.9 / loaders.torchvision_backend.AugParams: RandomResizedCrop(scale, ratio)
with torchvision's sampling rule (10 tries of area ~ U(scale) * W * H and log-aspect ~ U(log ratio),
w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)), accepted when it fits, else the
centre crop clamped to the ratio range), colour jitter with probability (brightness, contrast and
saturation factors ~ U(1 - x, 1 + x), hue ~ U(-x, x) of the hue circle), grayscale, Gaussian blur
(sigma ~ U(blur_sigma)), solarize and horizontal flip, each with its probability.

Every draw comes from a generator keyed by (seed, epoch, index, view): the same sample gets the same
views on any thread count, on resume and on every rank layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.color import colour_matrix
from loaders.torchvision_backend import AugParams


def rrc_box(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params in numpy.  -> (x0, y0, w, h) in pixels"""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return x0, y0, w, h
    in_ratio = width / height  # fallback: the whole image, clamped to the ratio range, centred
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


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


def sample_key(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, view, 0x5EED]))


def draw_views(aug: AugParams, seed: int, epoch: int, indices, sizes, view: int) -> ViewBatch:
    """View `view` (0 or 1) of each sample.  indices: (N,) dataset indices; sizes: (N, 2) (W, H) px."""
    n = len(indices)
    roi = np.empty((n, 4), np.float32)
    flip, jon, gray, bon, sol = (np.zeros(n, np.int32) for _ in range(5))
    jit = np.tile(np.array([1, 1, 1, 0], np.float32), (n, 1))
    sigma = np.zeros(n, np.float32)
    b, c, s, h = aug.jitter
    for k, (i, (W, H)) in enumerate(zip(indices, sizes)):
        rng = sample_key(seed, epoch, int(i), view)
        x0, y0, w, hh = rrc_box(rng, int(W), int(H), aug.crop_scale, aug.crop_ratio)
        roi[k] = (y0 / H, x0 / W, (y0 + hh) / H, (x0 + w) / W)
        u = rng.uniform(size=9)  # fixed count per sample: one draw per decision, in recipe order
        jon[k] = u[0] < aug.jitter_p
        jit[k] = (1 + b * (2 * u[1] - 1), 1 + c * (2 * u[2] - 1), 1 + s * (2 * u[3] - 1), 360 * h * (2 * u[4] - 1))
        gray[k] = u[5] < aug.gray_p
        bon[k] = u[6] < aug.blur_p
        sigma[k] = aug.blur_sigma[0] + (aug.blur_sigma[1] - aug.blur_sigma[0]) * u[7]
        sol[k] = rng.uniform() < aug.solarize_p
        flip[k] = u[8] < aug.flip_p
    cm = np.empty((n, 3, 3), np.float32)
    cb = np.empty((n, 2), np.float32)
    for k in range(n):
        bb, cc, ss, hh = jit[k] if jon[k] else (1.0, 1.0, 1.0, 0.0)
        cm[k] = colour_matrix(ss, hh, bool(gray[k]))
        cb[k] = (cc * bb, (1 - cc) * bb)
    return ViewBatch(roi, flip, jon, jit, gray, jon | gray, cm, cb, bon, sigma, sol)
