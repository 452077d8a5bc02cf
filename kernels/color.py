"""Colour jitter + grayscale of one uint8 HWC view as a single affine colour map (numpy + numba).

torchvision's ColorJitter (brightness b, contrast c, saturation s, hue h) followed by Grayscale,
taken in the order brightness -> contrast -> saturation -> hue -> grayscale, without the clamps
between ops, is affine in the pixel x (RGB):

    brightness:  x -> b x
    contrast:    x -> c x + (1 - c) mu 1,      mu = mean gray level of the (brightened) view
    saturation, hue, grayscale: a 3x3 map A in YIQ space (I, Q scaled by s, rotated by h; gray
                 keeps Y only) that maps gray vectors to themselves (A 1 = 1)

so  out = c b A x + (1 - c) b mu0 1,   mu0 = mean(0.299 R + 0.587 G + 0.114 B) of the input view.
One pass computes mu0, a second applies the map, rounds to nearest and clamps to [0, 255].

``colour_affine_hwc`` is plain Python that numba compiles: ``colour_affine`` (njit) here, and the
DALI backend hands the same function to DALI's numba operator, so the view pipeline runs it per
sample inside DALI's threads.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# RGB <-> YIQ (FCC NTSC); Y is ITU-R 601 luma, the weights of PIL's "L" conversion
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64)
RGB = np.linalg.inv(YIQ)


def colour_matrix(saturation: float, hue_deg: float, gray: bool) -> np.ndarray:
    """The 3x3 map A (RGB -> RGB) of saturation, hue rotation and grayscale.  -> (3, 3) float32"""
    th = math.radians(hue_deg)
    k = 0.0 if gray else saturation
    t = np.array([[1, 0, 0], [0, k * math.cos(th), -k * math.sin(th)], [0, k * math.sin(th), k * math.cos(th)]])
    return (RGB @ t @ YIQ).astype(np.float32)


def colour_matrices(saturation, hue_deg, gray) -> np.ndarray:
    """colour_matrix for a batch.  (N,), (N,), (N,) bool -> (N, 3, 3) float32"""
    th = np.radians(np.asarray(hue_deg, np.float64))
    k = np.where(np.asarray(gray, bool), 0.0, np.asarray(saturation, np.float64))
    t = np.zeros((len(th), 3, 3))
    t[:, 0, 0] = 1
    t[:, 1, 1] = t[:, 2, 2] = k * np.cos(th)
    t[:, 1, 2] = -k * np.sin(th)
    t[:, 2, 1] = k * np.sin(th)
    return (RGB @ t @ YIQ).astype(np.float32)


def colour_affine_hwc(out, img, m, cb):
    """out (H, W, 3) uint8 = round(clamp(cb[0] * m @ img[y, x] + cb[1] * mu0)), mu0 = mean luma.

    img (H, W, 3) uint8; m (3, 3) float32; cb (2,) float32 = (c * b, (1 - c) * b).
    """
    H, W = img.shape[0], img.shape[1]
    acc = 0.0
    for y in range(H):
        for x in range(W):
            acc += 0.299 * img[y, x, 0] + 0.587 * img[y, x, 1] + 0.114 * img[y, x, 2]
    off = np.float32(cb[1] * acc / max(H * W, 1)) + np.float32(0.5)  # + 0.5: round half up
    a00, a01, a02 = cb[0] * m[0, 0], cb[0] * m[0, 1], cb[0] * m[0, 2]
    a10, a11, a12 = cb[0] * m[1, 0], cb[0] * m[1, 1], cb[0] * m[1, 2]
    a20, a21, a22 = cb[0] * m[2, 0], cb[0] * m[2, 1], cb[0] * m[2, 2]
    for y in range(H):
        for x in range(W):
            r = np.float32(img[y, x, 0])
            g = np.float32(img[y, x, 1])
            b = np.float32(img[y, x, 2])
            v0 = a00 * r + a01 * g + a02 * b + off
            v1 = a10 * r + a11 * g + a12 * b + off
            v2 = a20 * r + a21 * g + a22 * b + off
            out[y, x, 0] = np.uint8(min(max(v0, np.float32(0.0)), np.float32(255.0)))
            out[y, x, 1] = np.uint8(min(max(v1, np.float32(0.0)), np.float32(255.0)))
            out[y, x, 2] = np.uint8(min(max(v2, np.float32(0.0)), np.float32(255.0)))


colour_affine = njit(nogil=True, cache=True)(colour_affine_hwc)


def colour_affine_reference(img: np.ndarray, m: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """numpy (float64) reference of colour_affine_hwc.  img (H, W, 3) uint8 -> (H, W, 3) uint8"""
    x = img.astype(np.float64)
    mu = (x @ np.array([0.299, 0.587, 0.114])).mean()
    y = cb[0] * (x @ m.astype(np.float64).T) + cb[1] * mu
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Gaussian blur of one uint8 HWC view (MoCo v2's blur: PIL GaussianBlur(radius=sigma), sigma the
# standard deviation in px)

def gaussian_blur_hwc(out, img, sigma):
    """out (H, W, 3) uint8 = img blurred by a Gaussian of std sigma[0] px, separable, taps truncated
    at 3 sigma (at least one each side), edges replicated; rounded to uint8 between the vertical and
    horizontal passes (as PIL does between its passes). out must not alias img."""
    H, W = img.shape[0], img.shape[1]
    s = max(sigma[0], np.float32(1e-3))
    r = max(1, int(np.ceil(3.0 * s)))
    w = np.empty(2 * r + 1, np.float32)
    tot = 0.0
    for k in range(-r, r + 1):
        w[k + r] = np.exp(-0.5 * (k / s) ** 2)
        tot += w[k + r]
    for k in range(2 * r + 1):
        w[k] = w[k] / tot
    n = 3 * W
    acc = np.empty(n, np.float32)
    for y in range(H):  # vertical pass: img -> out, a row of 3W values at a time (vectorised)
        acc[:] = 0
        for k in range(-r, r + 1):
            src = img[min(max(y + k, 0), H - 1)].reshape(n)
            wk = w[k + r]
            for i in range(n):
                acc[i] += wk * src[i]
        dst = out[y].reshape(n)
        for i in range(n):
            dst[i] = np.uint8(min(acc[i] + np.float32(0.5), np.float32(255.0)))
    row = np.empty(n, np.float32)
    for y in range(H):  # horizontal pass, in place: taps outer, pixels inner (vectorised)
        dst = out[y].reshape(n)
        for i in range(n):
            row[i] = dst[i]
        acc[:] = 0
        for k in range(-r, r + 1):
            wk = w[k + r]
            lo = min(max(0, -k), W)  # pixels x whose tap x + k lies inside the row
            hi = max(min(W, W - k), lo)
            a = acc[3 * lo:3 * hi]  # slices: indices from 0, so numba adds no negative-index fix-up
            src = row[3 * (lo + k):3 * (hi + k)]
            for i in range(a.shape[0]):
                a[i] += wk * src[i]
            for x in range(0, lo):  # left edge: replicate pixel 0
                for c in range(3):
                    acc[3 * x + c] += wk * row[c]
            for x in range(hi, W):  # right edge: replicate pixel W - 1
                for c in range(3):
                    acc[3 * x + c] += wk * row[3 * (W - 1) + c]
        for i in range(n):
            dst[i] = np.uint8(min(acc[i] + np.float32(0.5), np.float32(255.0)))


gaussian_blur = njit(nogil=True, cache=True)(gaussian_blur_hwc)


def gaussian_blur_reference(img: np.ndarray, sigma: float) -> np.ndarray:
    """numpy reference of gaussian_blur_hwc (same taps, edge replication and rounding)."""
    s = max(np.float32(sigma), np.float32(1e-3))
    r = max(1, int(np.ceil(3.0 * s)))
    k = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (k / np.float64(s)) ** 2)
    w = (w / w.sum()).astype(np.float32)
    x = img.astype(np.float32)
    H, W = img.shape[:2]
    v = sum(w[i] * x[np.clip(np.arange(H) + k[i], 0, H - 1)] for i in range(len(k)))
    v = np.floor(np.minimum(v + 0.5, 255)).astype(np.uint8).astype(np.float32)
    h = sum(w[i] * v[:, np.clip(np.arange(W) + k[i], 0, W - 1)] for i in range(len(k)))
    return np.floor(np.minimum(h + 0.5, 255)).astype(np.uint8)


@njit(nogil=True, cache=True)
def colour_map_into(saturation, hue_deg, gray, brightness, contrast, m, cb):
    """colour_matrix and the (c * b, (1 - c) * b) pair of one view, written into m (3, 3) and cb (2,)
    float32 (numba form, for pipelines that draw their parameters inside compiled code)."""
    th = hue_deg * math.pi / 180.0
    k = 0.0 if gray else saturation
    t11 = k * math.cos(th)
    t12 = -k * math.sin(th)
    t21 = k * math.sin(th)
    for r in range(3):
        # row r of RGB @ T: T = [[1, 0, 0], [0, t11, t12], [0, t21, t11]]
        q0 = RGB[r, 0]
        q1 = RGB[r, 1] * t11 + RGB[r, 2] * t21
        q2 = RGB[r, 1] * t12 + RGB[r, 2] * t11
        for c in range(3):
            m[r, c] = q0 * YIQ[0, c] + q1 * YIQ[1, c] + q2 * YIQ[2, c]
    cb[0] = contrast * brightness
    cb[1] = (1.0 - contrast) * brightness
