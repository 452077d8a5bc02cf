"""Fused MixMask mix + normalise + convert on the GPU (numba.cuda); the CUDA twin of kernels/mix.py.

MixMask (Vishniakov, Xing, Shen, arXiv 2210.11456), same formula and buffers as kernels/mix.py:

    out1[j] = (v1[j] - mean) / std,  out2[j] = (v2[j] - mean) / std,
    outm[j] = (where(up(M_j) == 1, v1[j], v1[perm[j]]) - mean) / std,
    up: cell_row(y) = (y * gh) // H, cell_col(x) = (x * gw) // W.

Arguments are CUDA arrays: numba device arrays, or anything with __cuda_array_interface__ (a torch
tensor, or numba.cuda.as_cuda_array(t, sync=False)); no host copies are made, host numpy arrays are
refused. bfloat16 outputs: pass an int16/uint16 view (torch: t.view(torch.int16); torch does not
export bf16 through the array interface). Any strides work; C-contiguous buffers coalesce best
(for a channels_last NCHW tensor t pass t.permute(0, 2, 3, 1), shape (N, H, W, 3)).

stream: a numba stream (the torch side passes
numba.cuda.external_stream(torch.cuda.current_stream().cuda_stream)); the kernel is enqueued on it
and nothing synchronises. The (3, 256) normalisation table is built on the host once per
(context, mean, std, dtype) and uploaded asynchronously on that stream from pinned memory (a one-
time device allocation; cached). Grid: one thread per output element (channels_last: blocks
over W*3, grid (ceil(W*3/128), H, N)) or per pixel (nchw, 3 channel stores), so all loads and
stores of a warp are contiguous; each thread computes its cell once, no grid-stride division.

Debugging: NUMBA_ENABLE_CUDASIM=1 (set before numba.cuda is imported) runs these kernels in the
simulator on the CPU -- slow, keep shapes tiny. uniform4_device is the RNG (kernels/rng.py) as a
device function, identical to the CPU and Python versions.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from kernels.mix import Layout, bits_dtype, normalise_lut, plan
from kernels.rng import _uniform4

THREADS = 128  # threads per block (x)

uniform4_device = cuda.jit(device=True)(_uniform4)


@cuda.jit
def _nhwc_mix(v1, v2, masks, perm, lut, out1, out2, outm):
    # v1, v2 (N, H, W, 3) uint8; masks (M, gh, gw) uint8; perm (N,) int64; lut (3, 256) bits;
    # outX (N, H, W, 3) bits. Thread = element k = 3 x + c of row y of sample j.
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    H = v1.shape[1]
    W = v1.shape[2]
    if k >= 3 * W:
        return
    x = k // 3
    c = k - 3 * x
    a = v1[j, y, x, c]
    out1[j, y, x, c] = lut[c, a]
    out2[j, y, x, c] = lut[c, v2[j, y, x, c]]
    mj = j if masks.shape[0] > 1 else 0
    if masks[mj, (y * masks.shape[1]) // H, (x * masks.shape[2]) // W] == 0:
        a = v1[perm[j], y, x, c]
    outm[j, y, x, c] = lut[c, a]


@cuda.jit
def _nhwc_clean(v1, v2, lut, out1, out2):
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    if k >= 3 * v1.shape[2]:
        return
    x = k // 3
    c = k - 3 * x
    out1[j, y, x, c] = lut[c, v1[j, y, x, c]]
    out2[j, y, x, c] = lut[c, v2[j, y, x, c]]


@cuda.jit
def _nchw_mix(v1, v2, masks, perm, lut, out1, out2, outm):
    # outX (N, 3, H, W) bits. Thread = pixel x of row y of sample j, writes 3 channel planes.
    x = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    H = v1.shape[1]
    W = v1.shape[2]
    if x >= W:
        return
    mj = j if masks.shape[0] > 1 else 0
    src = j
    if masks[mj, (y * masks.shape[1]) // H, (x * masks.shape[2]) // W] == 0:
        src = perm[j]
    for c in range(3):
        out1[j, c, y, x] = lut[c, v1[j, y, x, c]]
        out2[j, c, y, x] = lut[c, v2[j, y, x, c]]
        outm[j, c, y, x] = lut[c, v1[src, y, x, c]]


@cuda.jit
def _nchw_clean(v1, v2, lut, out1, out2):
    x = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    y = cuda.blockIdx.y
    j = cuda.blockIdx.z
    if x >= v1.shape[2]:
        return
    for c in range(3):
        out1[j, c, y, x] = lut[c, v1[j, y, x, c]]
        out2[j, c, y, x] = lut[c, v2[j, y, x, c]]


_LUTS: dict = {}  # (context id, mean, std, kind) -> (pinned host table, device table)


def device_lut(mean, std, kind, stream=0):
    """(3, 256) device table of normalised values in the output bits; cached, async upload."""
    ctx = cuda.current_context()
    key = (id(ctx), np.asarray(mean, np.float32).tobytes(), np.asarray(std, np.float32).tobytes(), kind)
    hit = _LUTS.get(key)
    if hit is None:
        lut = normalise_lut(mean, std, kind)
        host = cuda.pinned_array(lut.shape, lut.dtype)  # pinned: the copy is truly asynchronous
        host[...] = lut
        hit = _LUTS[key] = (host, cuda.to_device(host, stream=stream))  # keep host alive
    return hit[1]


def _device(name, a):
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name} is a host numpy array; pass a CUDA array (no implicit copies)")
    if getattr(a, "__cuda_ndarray__", False):  # numba device array (or the simulator's)
        return a
    if cuda.is_cuda_array(a):
        return cuda.as_cuda_array(a, sync=False)
    raise TypeError(f"{name} must be a CUDA array, got {type(a).__name__}")


def fused_mix_cuda(v1, v2, masks, perm, mean, std, out1, out2, outm=None,
                   layout: Layout = "channels_last", stream=0) -> None:
    """Enqueue the fused mix on `stream` (never synchronises). See the module docstring."""
    v1, v2, masks, perm = (_device(n, a) for n, a in (("v1", v1), ("v2", v2), ("masks", masks), ("perm", perm)))
    out1, out2, outm = (_device(n, a) for n, a in (("out1", out1), ("out2", out2), ("outm", outm)))
    p = plan(v1, v2, masks, perm, out1, out2, outm, layout)
    if p.N == 0 or p.H == 0 or p.W == 0:
        return
    bits = bits_dtype(p.kind)
    lut = device_lut(mean, std, p.kind, stream)
    o1, o2 = out1.view(bits), out2.view(bits)
    width = p.W if p.nchw else 3 * p.W
    threads = min(THREADS, 32 * math.ceil(width / 32))  # whole warps; no idle warps on small images
    grid = (math.ceil(width / threads), p.H, p.N)
    if p.M:
        kernel = _nchw_mix if p.nchw else _nhwc_mix
        kernel[grid, threads, stream](v1, v2, masks, perm, lut, o1, o2, outm.view(bits))
    else:
        kernel = _nchw_clean if p.nchw else _nhwc_clean
        kernel[grid, threads, stream](v1, v2, lut, o1, o2)
