"""Float kernels of the masking family, on normalised views: noise fill, high-pass filter, mixup.
CPU (numba njit, parallel) and plain-numpy references; the CUDA twins are in kernels/fill_cuda.py.
docs/methods.md §7.

Every view is a float32 array x of LOGICAL shape (N, C, H, W) with any strides (a channels_last torch
tensor passes its .numpy() view as is; the loops visit memory in NHWC order, which is contiguous
for channels_last and correct for any layout).

noise_fill_(x, masks, boxes, std, seed, epoch, batch_index, stream)        in place
    MSCN erase masking (Jing et al., arXiv 2206.07700) and saliency-guided masking (Chin et al.,
    arXiv 2309.12757): pixel (c, y, x) of sample j is REPLACED by std * z_j(c, y, x) when
        masks[j, c if Cm > 1 else 0, (y * gh) // H, (x * gw) // W] == 0         (a masked cell)
     or boxes[j] = (top, left, h, w) with h > 0 and (y, x) outside that window    (focal masking)
    masks (N, Cm, gh, gw) uint8, Cm in {1, C} (spatial or channel-wise), 1 = keep; boxes (N, 4) int64.
    z_j(e) ~ N(0, 1) is a pure function of (seed, epoch, batch_index, j, stream, e), with
    e = (c * H + y) * W + x the logical element index: Philox call k = stream * 2**24 + e // 4
    (kernels/rng.py: uniform4(seed, epoch, batch_index, j, k) -> u0..u3), Box-Muller on the pairs
        z[4k]   = sqrt(-2 ln(1 - u0)) cos(2 pi u1),  z[4k+1] = sqrt(-2 ln(1 - u0)) sin(2 pi u1)
        z[4k+2] = sqrt(-2 ln(1 - u2)) cos(2 pi u3),  z[4k+3] = sqrt(-2 ln(1 - u2)) sin(2 pi u3)
    in float64, then std * z rounded to float32. Every cell gets its own draw (the reference code of
    Chin et al. reused one noise patch for every cell), a run is reproducible, and a resumed run
    draws the same noise. Streams separate the draws of one sample (kernels/rng.py STREAMS).

high_pass(x, out, ksize, sigma)
    MSCN's high-pass filter: out = x - G * x, G the normalised 1-D Gaussian
    g[i] = exp(-((i - (k-1)/2) / sigma)^2 / 2) / sum, applied along W then H with reflect padding
    (torchvision's gaussian_blur). The blur is accumulated in float32, taps in index order, on every route
    (kernel, reference, CUDA), so they agree bit for bit.

mixup(x, perm, lam, out)
    Un-Mix's global mixup (Shen et al., AAAI 2022): out[j] = lam_j x[j] + (1 - lam_j) x[perm[j]],
    float32. (Mixing normalised values equals normalising mixed pixels: the map is affine.)
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels.rng import STREAM_SHIFT, uniform4, uniform4_reference


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by the CPU, reference and CUDA entry points)

def check_fill(x, masks, boxes) -> tuple[int, int, int, int]:
    if len(x.shape) != 4:
        raise ValueError(f"x must be (N, C, H, W), got {x.shape}")
    N, C, H, W = (int(s) for s in x.shape)
    if np.dtype(x.dtype) != np.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if len(masks.shape) != 4 or int(masks.shape[0]) != N or int(masks.shape[1]) not in (1, C) or min(masks.shape[2:]) < 1:
        raise ValueError(f"masks must be (N={N}, 1 or C={C}, gh, gw), got {masks.shape}")
    if np.dtype(masks.dtype) != np.uint8:
        raise TypeError(f"masks must be uint8, got {masks.dtype}")
    if tuple(boxes.shape) != (N, 4) or np.dtype(boxes.dtype) != np.int64:
        raise ValueError(f"boxes must be (N={N}, 4) int64 (top, left, h, w; h = 0: no window)")
    if C * H * W > (1 << STREAM_SHIFT) * 4:
        raise ValueError(f"an image of {C}x{H}x{W} elements exceeds one noise stream (2**{STREAM_SHIFT + 2})")
    return N, C, H, W


def check_pair(x, out) -> None:
    if len(x.shape) != 4 or tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"x and out must both be (N, C, H, W), got {x.shape}, {out.shape}")
    if np.dtype(x.dtype) != np.float32 or np.dtype(out.dtype) != np.float32:
        raise TypeError(f"x and out must be float32, got {x.dtype}, {out.dtype}")


def gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
    """(ksize,) float32 normalised Gaussian taps (torchvision's _get_gaussian_kernel1d)."""
    if ksize < 1 or ksize % 2 == 0 or not sigma > 0:
        raise ValueError(f"the Gaussian needs an odd ksize >= 1 and sigma > 0, got {ksize}, {sigma}")
    half = (ksize - 1) * 0.5
    t = np.linspace(-half, half, ksize, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def reflect_index(i: int, n: int) -> int:
    """Index of reflect padding (no edge repeat: -1 -> 1, n -> n - 2), valid for |overhang| < n."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


# ---------------------------------------------------------------------------------------------
# Compiled CPU kernels (NUMBA_DISABLE_JIT=1 runs them as Python)

def box_muller(u0, u1, u2, u3, lane):
    """Normal number ``lane`` (0-3) of the Box-Muller pairs of one Philox call (module docstring), float64.
    Backend-neutral source: compiled here with njit and in kernels/fill_cuda.py as a device function."""
    if lane < 2:
        r = math.sqrt(-2.0 * math.log(1.0 - u0))
        a = 2.0 * math.pi * u1
    else:
        r = math.sqrt(-2.0 * math.log(1.0 - u2))
        a = 2.0 * math.pi * u3
    return r * math.cos(a) if (lane & 1) == 0 else r * math.sin(a)


_reflect = njit(inline="always")(reflect_index)
_box_muller = njit(inline="always")(box_muller)


@njit(nogil=True, inline="always")
def _normal(seed, epoch, batch_index, j, stream, e):
    """z_j(e): the e-th standard normal of sample j's stream (module docstring)."""
    u0, u1, u2, u3 = uniform4(seed, epoch, batch_index, j, (stream << STREAM_SHIFT) + (e >> 2))
    return _box_muller(u0, u1, u2, u3, e & 3)


@njit(parallel=True, nogil=True, cache=True)
def _noise_fill(x, masks, boxes, std, seed, epoch, batch_index, stream):
    N, C, H, W = x.shape
    Cm, gh, gw = masks.shape[1], masks.shape[2], masks.shape[3]
    for t in prange(N * H):
        j = t // H
        y = t - j * H
        top, left, bh, bw = boxes[j, 0], boxes[j, 1], boxes[j, 2], boxes[j, 3]
        outside_rows = bh > 0 and (y < top or y >= top + bh)
        cr = (y * gh) // H
        for xx in range(W):
            focal = bh > 0 and (outside_rows or xx < left or xx >= left + bw)
            cc = (xx * gw) // W
            for c in range(C):
                if focal or masks[j, c if Cm > 1 else 0, cr, cc] == 0:
                    e = (c * H + y) * W + xx
                    x[j, c, y, xx] = np.float32(std * _normal(seed, epoch, batch_index, j, stream, e))


@njit(parallel=True, nogil=True, cache=True)
def _high_pass(x, out, taps):
    N, C, H, W = x.shape
    K = taps.shape[0]
    half = K // 2
    for p in prange(N * C):
        j = p // C
        c = p - j * C
        tmp = np.empty((H, W), np.float32)  # (H, W) the row-blurred plane
        for y in range(H):
            for xx in range(W):
                acc = np.float32(0.0)
                for i in range(K):
                    acc += taps[i] * x[j, c, y, _reflect(xx + i - half, W)]
                tmp[y, xx] = acc
        for y in range(H):
            for xx in range(W):
                acc = np.float32(0.0)
                for i in range(K):
                    acc += taps[i] * tmp[_reflect(y + i - half, H), xx]
                out[j, c, y, xx] = x[j, c, y, xx] - acc


@njit(parallel=True, nogil=True, cache=True)
def _mixup(x, perm, lam, out):
    N, C, H, W = x.shape
    for t in prange(N * H):
        j = t // H
        y = t - j * H
        a = np.float32(lam[j])
        b = np.float32(1.0) - a
        q = perm[j]
        for xx in range(W):
            for c in range(C):
                out[j, c, y, xx] = a * x[j, c, y, xx] + b * x[q, c, y, xx]


def noise_fill_(x, masks, boxes, std: float, seed: int, epoch: int, batch_index: int, stream: int) -> None:
    """Replace the masked pixels of x (N, C, H, W) float32 by seeded Gaussian noise, in place (CPU)."""
    N, C, H, W = check_fill(x, masks, boxes)
    if N and H and W:
        _noise_fill(x, np.ascontiguousarray(masks), np.ascontiguousarray(boxes), float(std), np.uint64(seed),
                    np.int64(epoch), np.int64(batch_index), np.int64(stream))


def high_pass(x, out, ksize: int = 11, sigma: float = 5.0) -> None:
    """out = x - GaussianBlur(x; ksize, sigma), reflect padding (CPU). x, out (N, C, H, W) float32."""
    check_pair(x, out)
    taps = gaussian_taps(ksize, sigma)
    if min(x.shape[2:]) <= ksize // 2:
        raise ValueError(f"reflect padding of {ksize // 2} needs H, W > {ksize // 2}, got {x.shape[2:]}")
    if np.may_share_memory(x, out):
        raise ValueError("high_pass needs out apart from x")
    _high_pass(x, out, taps)


def mixup(x, perm, lam, out) -> None:
    """out[j] = lam_j x[j] + (1 - lam_j) x[perm[j]] (CPU). x, out (N, C, H, W) float32; perm (N,) int64."""
    check_pair(x, out)
    _check_mixup(x, perm, lam, out)
    _mixup(x, np.ascontiguousarray(perm), np.ascontiguousarray(lam, np.float32), out)


def _check_mixup(x, perm, lam, out) -> None:
    N = int(x.shape[0])
    if tuple(perm.shape) != (N,) or np.dtype(perm.dtype) != np.int64 or tuple(lam.shape) != (N,):
        raise ValueError(f"perm must be (N={N},) int64 and lam (N,), got {perm.shape} {perm.dtype}, {lam.shape}")
    if N and (np.asarray(perm).min() < 0 or np.asarray(perm).max() >= N):
        raise ValueError(f"perm entries must lie in [0, N={N})")
    if np.may_share_memory(x, out):
        raise ValueError("mixup needs out apart from x (partners are read after they would be written)")


# ---------------------------------------------------------------------------------------------
# Plain numpy references, straight from the formulas

def normals_reference(seed: int, epoch: int, batch_index: int, j: int, stream: int, count: int) -> np.ndarray:
    """z_j(0 .. count-1) with Python-int Philox (kernels/rng.py reference) -> (count,) float64."""
    calls = -(-count // 4)
    u = np.array([uniform4_reference(seed, epoch, batch_index, j, (stream << STREAM_SHIFT) + k)
                  for k in range(calls)], np.float64).reshape(calls, 4)
    r01 = np.sqrt(-2.0 * np.log(1.0 - u[:, 0]))
    r23 = np.sqrt(-2.0 * np.log(1.0 - u[:, 2]))
    z = np.stack([r01 * np.cos(2 * np.pi * u[:, 1]), r01 * np.sin(2 * np.pi * u[:, 1]),
                  r23 * np.cos(2 * np.pi * u[:, 3]), r23 * np.sin(2 * np.pi * u[:, 3])], 1)
    return z.reshape(-1)[:count]


def filled_reference(masks, boxes, C: int, H: int, W: int) -> np.ndarray:
    """(N, C, H, W) bool: which elements noise_fill_ replaces."""
    masks, boxes = np.asarray(masks), np.asarray(boxes)
    gh, gw = masks.shape[2:]
    up = masks[:, :, (np.arange(H) * gh) // H][:, :, :, (np.arange(W) * gw) // W] == 0  # (N, Cm, H, W)
    fill = np.broadcast_to(up, (len(masks), C, H, W)).copy()
    for j, (top, left, h, w) in enumerate(boxes):
        if h > 0:
            window = np.zeros((H, W), bool)
            window[top:top + h, left:left + w] = True
            fill[j] |= ~window
    return fill


def noise_fill_reference(x, masks, boxes, std, seed, epoch, batch_index, stream) -> None:
    N, C, H, W = check_fill(x, masks, boxes)
    fill = filled_reference(masks, boxes, C, H, W)
    for j in range(N):
        noise = (std * normals_reference(seed, epoch, batch_index, j, stream, C * H * W)).astype(np.float32)
        x[j][fill[j]] = noise.reshape(C, H, W)[fill[j]]


def high_pass_reference(x, out, ksize: int = 11, sigma: float = 5.0) -> None:
    """The same float32 arithmetic as the kernel (taps in index order), so every route gives the same bits."""
    check_pair(x, out)
    g = gaussian_taps(ksize, sigma)
    half = ksize // 2
    H, W = x.shape[2:]
    x = np.asarray(x, np.float32)
    xp = np.pad(x, ((0, 0), (0, 0), (0, 0), (half, half)), mode="reflect")   # (N, C, H, W + 2 half)
    rows = np.zeros(x.shape, np.float32)
    for i in range(ksize):
        rows += g[i] * xp[:, :, :, i:i + W]                                   # blur along W
    rp = np.pad(rows, ((0, 0), (0, 0), (half, half), (0, 0)), mode="reflect")  # (N, C, H + 2 half, W)
    blur = np.zeros(x.shape, np.float32)
    for i in range(ksize):
        blur += g[i] * rp[:, :, i:i + H, :]                                   # then along H
    out[...] = x - blur


def mixup_reference(x, perm, lam, out) -> None:
    check_pair(x, out)
    _check_mixup(x, perm, lam, out)
    lam = np.asarray(lam, np.float32)[:, None, None, None]
    out[...] = lam * x + (np.float32(1) - lam) * np.asarray(x)[np.asarray(perm)]
