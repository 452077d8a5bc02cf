"""Per-sample MoCo v2 view parameters, drawn in numba from the counter-based generator (kernels/rng.py).

For sample `index` and view `view` (0 or 1), every number is uniform4(seed, epoch, VIEW_KEY + view,
index, counter): a pure function of its keys, so the views are the same on any thread count, rank
layout or resume, and ~1 us a sample (a numpy Generator per sample cost ~40 us, the DALI feeder's
limit on a GPU). VIEW_KEY = 2**30 keeps these draws apart from the mask draws, whose batch slot is
step * world + rank.

RandomResizedCrop follows torchvision's rule (get_params): up to 10 tries (counters 0-9) of
area = U(scale) * W * H and aspect = exp(U(log ratio)), w = round(sqrt(area * aspect)),
h = round(sqrt(area / aspect)), accepted if it fits, at a uniform offset; else the whole image
clamped to the ratio range, centred. Counters 10-12 give the jitter switch and factors
(b, c, s ~ U(1 - x, 1 + x), hue ~ U(-x, x) of the circle, returned in degrees), grayscale, blur
switch and sigma ~ U(blur_sigma), solarize, flip.

ContrastiveCrop (Peng et al., CVPR 2022; kernels/ccrop.py): with alpha > 0 the accepted crop's
offset is instead drawn around the sample's box (y0, x0, y1, x1) in normalised coordinates,
    top = ch0 + int((ch1 - ch0) b_y),  ch0 = max(int(H y0) - h // 2, 0),  ch1 = min(int(H y1) - h // 2, H - h)
    left = cw0 + int((cw1 - cw0) b_x), likewise with W, w, x0, x1;   b_y, b_x ~ Beta(alpha, alpha)
from counters >= 16. Size, tries and fallback are unchanged, and alpha <= 0 is exactly
RandomResizedCrop (bit for bit the draws without the feature).
"""
from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.ccrop import ccrop_offset, ccrop_offset_reference
from kernels.rng import uniform4, uniform4_reference

VIEW_KEY = 1 << 30


@njit(nogil=True, cache=True)
def draw_one(seed, epoch, view, i, W, H, scale, ratio, p, jit, sigma_range, box, alpha):
    """One sample's view: (y0, x0, h, w) crop window in px, flip, jitter_on, (b, c, s, hue degrees),
    gray, blur_on, sigma, solarize. Arguments as draw_view_params (seed: np.uint64); box (4,) float
    = (y0, x0, y1, x1) normalised, used only when alpha > 0 (ContrastiveCrop's Beta(alpha, alpha)
    offsets; alpha <= 0: RandomResizedCrop's uniform offsets)."""
    slot = VIEW_KEY + view
    log_lo = math.log(ratio[0])
    log_hi = math.log(ratio[1])
    area = W * H
    x0 = y0 = w = h = -1
    for t in range(10):
        u0, u1, u2, u3 = uniform4(seed, epoch, slot, i, t)
        target = area * (scale[0] + (scale[1] - scale[0]) * u0)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u1)
        tw = int(round(math.sqrt(target * aspect)))
        th = int(round(math.sqrt(target / aspect)))
        if 0 < tw <= W and 0 < th <= H:
            w, h = tw, th
            if alpha > 0.0:  # ContrastiveCrop: Beta offsets around the box (kernels/ccrop.py)
                y0, x0 = ccrop_offset(seed, epoch, slot, i, W, H, w, h, box, alpha)
            else:
                y0 = min(int(u2 * (H - h + 1)), H - h)
                x0 = min(int(u3 * (W - w + 1)), W - w)
            break
    if w < 0:  # fallback: the whole image clamped to the ratio range, centred
        in_ratio = W / H
        if in_ratio < ratio[0]:
            w, h = W, int(round(W / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = H, int(round(H * ratio[1]))
        else:
            w, h = W, H
        x0, y0 = (W - w) // 2, (H - h) // 2
    a0, a1, a2, a3 = uniform4(seed, epoch, slot, i, 10)
    b0, b1, b2, b3 = uniform4(seed, epoch, slot, i, 11)
    c0, c1, _, _ = uniform4(seed, epoch, slot, i, 12)
    jitter = (1 + jit[0] * (2 * a1 - 1), 1 + jit[1] * (2 * a2 - 1), 1 + jit[2] * (2 * a3 - 1),
              360 * jit[3] * (2 * b0 - 1))
    sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * b3
    return (y0, x0, h, w, c1 < p[4], a0 < p[0], jitter, b1 < p[1], b2 < p[2], sigma, c0 < p[3])


def crop_window_reference(seed: int, epoch: int, view: int, i: int, W: int, H: int, scale, ratio, box=(0, 0, 1, 1),
                          alpha: float = 0.0) -> tuple[int, int, int, int]:
    """draw_one's crop window (y0, x0, h, w) in plain Python (uniform4_reference; kernels/ccrop.py's
    reference for alpha > 0): torchvision's RandomResizedCrop.get_params rule on the keyed uniforms."""
    slot = VIEW_KEY + view
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        u0, u1, u2, u3 = uniform4_reference(seed, epoch, slot, i, t)
        target = W * H * (scale[0] + (scale[1] - scale[0]) * u0)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u1)
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            if alpha > 0:
                y0, x0 = ccrop_offset_reference(seed, epoch, slot, i, W, H, w, h, box, alpha)
            else:
                y0, x0 = min(int(u2 * (H - h + 1)), H - h), min(int(u3 * (W - w + 1)), W - w)
            return y0, x0, h, w
    in_ratio = W / H
    if in_ratio < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = H, int(round(H * ratio[1]))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


@njit(nogil=True, cache=True)
def draw_view_params(seed, epoch, view, indices, sizes, scale, ratio, p, jit, sigma_range, boxes, alpha,
                     roi, flip, jitter_on, jitter, gray, blur_on, sigma, solarize):
    """indices (N,) int64; sizes (N, 2) int64 (W, H) px; scale, ratio, sigma_range (2,) float64;
    p (5,) float64 = (jitter, gray, blur, solarize, flip) probabilities; jit (4,) float64 jitter
    strengths; boxes (N, 4) float32 = (y0, x0, y1, x1) normalised ContrastiveCrop boxes and alpha
    (float; <= 0: plain RandomResizedCrop, boxes unused). Writes roi (N, 4) float32 = (y0, x0, y1, x1)
    fractions, flip/jitter_on/gray/blur_on/solarize (N,) int32, jitter (N, 4) float32, sigma (N,) float32."""
    s = np.uint64(seed)
    for k in range(indices.shape[0]):
        W = sizes[k, 0]
        H = sizes[k, 1]
        y0, x0, h, w, fl, jon, jt, gr, bon, sg, sol = draw_one(s, epoch, view, indices[k], W, H, scale, ratio,
                                                              p, jit, sigma_range, boxes[k], alpha)
        roi[k, 0] = y0 / H
        roi[k, 1] = x0 / W
        roi[k, 2] = (y0 + h) / H
        roi[k, 3] = (x0 + w) / W
        flip[k] = fl
        jitter_on[k] = jon
        for q in range(4):
            jitter[k, q] = jt[q]
        gray[k] = gr
        blur_on[k] = bon
        sigma[k] = sg
        solarize[k] = sol


@intrinsic
def _as_pointer(typingctx, address):
    """int64 address -> void* (to read a cell the Python side updates between calls)."""
    sig = types.voidptr(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return sig, codegen


@njit(nogil=True)
def read_cell(address):
    """The int64 at `address` (e.g. a one-element numpy array's ctypes.data), read at run time: lets
    compiled pipeline code see a value (the epoch) that the host changes after compilation."""
    return carray(_as_pointer(address), (1,), np.int64)[0]


@njit(nogil=True)
def read_boxes(address, n):
    """The (n, 4) float32 box table at `address` (a C-contiguous array's ctypes.data), read at run
    time: compiled pipeline code (FFCV) sees the rows the host rewrites after compilation."""
    return carray(_as_pointer(address), (n, 4), np.float32)


@njit(nogil=True)
def read_int64(address, n):
    """The (n,) int64 array at `address`, read at run time (as read_boxes)."""
    return carray(_as_pointer(address), (n,), np.int64)
