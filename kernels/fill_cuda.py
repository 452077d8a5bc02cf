"""Float kernels of the masking family on the GPU (numba.cuda): the CUDA twins of kernels/fill.py.

    noise_fill_(x, masks, boxes, std, seed, epoch, batch_index, stream, cuda_stream=0)   in place
    high_pass(x, out, ksize=11, sigma=5.0, cuda_stream=0)
    mixup(x, perm, lam, out, cuda_stream=0)

Same formulas, arguments and checks as kernels/fill.py (see its docstring: the noise draw z_j(e),
Philox call k = stream * 2**24 + e // 4, Box-Muller in float64, lane e % 4, std * z rounded to float32;
the separable Gaussian with reflect padding, accumulated in float32 in tap order; the float32 mixup
a x + (1 - a) x[perm], a = float32(lam_j)). Never imports torch.

Arguments are CUDA arrays: numba device arrays, or anything with __cuda_array_interface__ (a torch
tensor, a channels_last one passed as is); host numpy arrays are refused (TypeError), nothing is
copied between host and device except the small cached table of Gaussian taps. x, out are float32 of
LOGICAL shape (N, C, H, W) with any strides. cuda_stream: a numba stream (the torch side passes
numba.cuda.external_stream(torch.cuda.current_stream().cuda_stream)) or 0; kernels are enqueued on it
and nothing synchronises.

Grid: one thread per element, grid (ceil(C*W / threads), H, N), a block row walking one image row
(j, y) in memory order: (x, c) pairs with c fastest when the channel stride is the smallest
(channels_last), else channel planes with x fastest (NCHW), so the loads and stores of a warp are
contiguous either way. high_pass blurs the rows into a temporary (N, C, H, W) float32 device array
allocated on the stream with the layout of `out`, then blurs its columns.

Exactness: float32 products and sums go through libdevice's fmul_rn / fadd_rn, so NVVM cannot contract
them into FMAs and high_pass / mixup round exactly like the CPU kernels. The noise is bit-identical to
kernels/fill.py under the simulator (Python math); on a GPU, libdevice's float64 log / sin / cos may
differ from the CPU's libm in the last bit of z (so, rarely, in the last bit of the float32 value).

Debugging: NUMBA_ENABLE_CUDASIM=1 (set before numba.cuda is imported) runs these kernels in the
simulator on the CPU -- slow, keep shapes tiny.
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32

from kernels.fill import box_muller, check_fill, check_pair, gaussian_taps, reflect_index
from kernels.mix_cuda import THREADS, _device, _ptr, _upload, uniform4_device
from kernels.rng import STREAM_SHIFT

if config.ENABLE_CUDASIM:  # the simulator runs kernels as Python: numpy float32 scalars round alike
    def _fmul(a, b):
        return a * b

    def _fadd(a, b):
        return a + b
else:  # round-to-nearest float32 ops that NVVM never fuses into an FMA (the CPU kernels do not fuse)
    from numba.cuda import libdevice

    _fmul = libdevice.fmul_rn
    _fadd = libdevice.fadd_rn

_reflect = cuda.jit(device=True, inline=True)(reflect_index)


# ---------------------------------------------------------------------------------------------
# Device functions and kernels

_box_muller = cuda.jit(device=True, inline=True)(box_muller)


@cuda.jit(device=True, inline=True)
def _normal(seed, epoch, batch_index, j, stream, e):
    """z_j(e): the e-th standard normal of sample j's stream (kernels/fill.py docstring)."""
    u0, u1, u2, u3 = uniform4_device(seed, epoch, batch_index, j, (stream << STREAM_SHIFT) + (e >> 2))
    return _box_muller(u0, u1, u2, u3, e & 3)


@cuda.jit(device=True, inline=True)
def _element(k, C, W, cl):
    """(c, x) of thread k of an image row: channels fastest when cl (channels_last), else x fastest."""
    if cl:
        xx = k // C
        return k - C * xx, xx
    c = k // W
    return c, k - c * W


@cuda.jit
def _noise_fill_kernel(x, masks, boxes, std, seed, epoch, batch_index, stream, cl):
    # x (N, C, H, W) float32, any strides; masks (N, Cm, gh, gw) uint8; boxes (N, 4) int64.
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    if k >= C * W:
        return
    c, xx = _element(k, C, W, cl)
    fill = False
    bh = boxes[j, 2]
    if bh > 0:
        top = boxes[j, 0]
        left = boxes[j, 1]
        bw = boxes[j, 3]
        fill = y < top or y >= top + bh or xx < left or xx >= left + bw
    if not fill:
        mc = c if masks.shape[1] > 1 else 0
        fill = masks[j, mc, (y * masks.shape[2]) // H, (xx * masks.shape[3]) // W] == 0
    if fill:
        e = (c * H + y) * W + xx
        x[j, c, y, xx] = float32(std * _normal(seed, epoch, batch_index, j, stream, e))


@cuda.jit
def _blur_rows_kernel(x, taps, tmp, cl):
    # tmp[j, c, y, x] = sum_i taps[i] x[j, c, y, reflect(x + i - K // 2)], float32, i ascending.
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    C = x.shape[1]
    W = x.shape[3]
    if k >= C * W:
        return
    c, xx = _element(k, C, W, cl)
    K = taps.shape[0]
    half = K // 2
    acc = float32(0.0)
    for i in range(K):
        acc = _fadd(acc, _fmul(taps[i], x[j, c, y, _reflect(xx + i - half, W)]))
    tmp[j, c, y, xx] = acc


@cuda.jit
def _high_pass_cols_kernel(x, tmp, taps, out, cl):
    # out[j, c, y, x] = x[j, c, y, x] - sum_i taps[i] tmp[j, c, reflect(y + i - K // 2), x].
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    if k >= C * W:
        return
    c, xx = _element(k, C, W, cl)
    K = taps.shape[0]
    half = K // 2
    acc = float32(0.0)
    for i in range(K):
        acc = _fadd(acc, _fmul(taps[i], tmp[j, c, _reflect(y + i - half, H), xx]))
    out[j, c, y, xx] = x[j, c, y, xx] - acc


@cuda.jit
def _mixup_kernel(x, perm, lam, out, cl):
    # out[j] = a x[j] + b x[perm[j]], a = float32(lam[j]), b = 1 - a (float32).
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    C = x.shape[1]
    W = x.shape[3]
    if k >= C * W:
        return
    c, xx = _element(k, C, W, cl)
    a = float32(lam[j])
    b = float32(1.0) - a
    q = perm[j]
    out[j, c, y, xx] = _fadd(_fmul(a, x[j, c, y, xx]), _fmul(b, x[q, c, y, xx]))


# ---------------------------------------------------------------------------------------------
# Host side: checks and launches (enqueue only)

def _channels_last(a) -> bool:
    """True when the channel stride is the smallest of (C, W): walk (x, c) with c fastest."""
    return int(a.shape[1]) > 1 and abs(int(a.strides[1])) < abs(int(a.strides[3]))


def _launch_config(C: int, W: int, H: int, N: int):
    width = C * W
    threads = min(THREADS, 32 * math.ceil(width / 32))  # whole warps; no idle warps on small images
    return (math.ceil(width / threads), H, N), threads


def _span(a) -> tuple[int, int]:
    """[lo, hi) byte range a device array touches (empty arrays: an empty range)."""
    lo = hi = _ptr(a)
    for n, s in zip(a.shape, a.strides):
        if int(n) == 0:
            return lo, lo
        if s >= 0:
            hi += (int(n) - 1) * int(s)
        else:
            lo += (int(n) - 1) * int(s)
    return lo, hi + np.dtype(a.dtype).itemsize


def _overlap(a, b) -> bool:
    (alo, ahi), (blo, bhi) = _span(a), _span(b)
    return alo < ahi and blo < bhi and alo < bhi and blo < ahi


def noise_fill_(x, masks, boxes, std: float, seed: int, epoch: int, batch_index: int, stream: int,
                cuda_stream=0) -> None:
    """Replace the masked pixels of x (N, C, H, W) float32 by seeded Gaussian noise, in place (GPU;
    enqueued on cuda_stream). masks (N, 1 or C, gh, gw) uint8, boxes (N, 4) int64 on the device."""
    x, masks, boxes = (_device(n, a) for n, a in (("x", x), ("masks", masks), ("boxes", boxes)))
    N, C, H, W = check_fill(x, masks, boxes)
    if not (N and C and H and W):
        return
    grid, threads = _launch_config(C, W, H, N)
    _noise_fill_kernel[grid, threads, cuda_stream](x, masks, boxes, float(std), np.uint64(seed), np.int64(epoch),
                                                   np.int64(batch_index), np.int64(stream), _channels_last(x))


def high_pass(x, out, ksize: int = 11, sigma: float = 5.0, cuda_stream=0) -> None:
    """out = x - GaussianBlur(x; ksize, sigma), reflect padding (GPU; enqueued on cuda_stream).
    x, out (N, C, H, W) float32 device arrays, out apart from x."""
    x, out = _device("x", x), _device("out", out)
    check_pair(x, out)
    taps = gaussian_taps(ksize, sigma)
    if min(int(s) for s in x.shape[2:]) <= ksize // 2:
        raise ValueError(f"reflect padding of {ksize // 2} needs H, W > {ksize // 2}, got {tuple(x.shape[2:])}")
    if _overlap(x, out):
        raise ValueError("high_pass needs out apart from x")
    N, C, H, W = (int(s) for s in x.shape)
    if not (N and C):
        return
    d_taps = _upload(("gauss_taps", int(ksize), taps.tobytes()), lambda: taps, cuda_stream)
    cl = _channels_last(out)
    strides = (H * W * C * 4, 4, W * C * 4, C * 4) if cl else None  # the temporary follows out's layout
    tmp = cuda.device_array((N, C, H, W), np.float32, strides=strides, stream=cuda_stream)
    grid, threads = _launch_config(C, W, H, N)
    _blur_rows_kernel[grid, threads, cuda_stream](x, d_taps, tmp, cl)
    _high_pass_cols_kernel[grid, threads, cuda_stream](x, tmp, d_taps, out, cl)


def mixup(x, perm, lam, out, cuda_stream=0) -> None:
    """out[j] = lam_j x[j] + (1 - lam_j) x[perm[j]] (GPU; enqueued on cuda_stream). x, out (N, C, H, W)
    float32, perm (N,) int64, lam (N,) (float32; other float dtypes are rounded to float32 per sample)."""
    x, perm, lam, out = (_device(n, a) for n, a in (("x", x), ("perm", perm), ("lam", lam), ("out", out)))
    check_pair(x, out)
    N = int(x.shape[0])
    if tuple(perm.shape) != (N,) or np.dtype(perm.dtype) != np.int64 or tuple(lam.shape) != (N,):
        raise ValueError(f"perm must be (N={N},) int64 and lam (N,), got {perm.shape} {perm.dtype}, {lam.shape}")
    if _overlap(x, out):
        raise ValueError("mixup needs out apart from x (partners are read after they would be written)")
    # perm's range is not checked here (that would copy it to the host and synchronise): callers pass
    # permutations made by mixmask.masks.partner_permutation / mixmask.mixing.base.partner
    N, C, H, W = (int(s) for s in x.shape)
    if not (N and C and H and W):
        return
    grid, threads = _launch_config(C, W, H, N)
    _mixup_kernel[grid, threads, cuda_stream](x, perm, lam, out, _channels_last(out))
