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

Vectorised path (taken when W % 4 == 0 and every buffer is C-contiguous and aligned, as torch's
allocations of 224 x 224 batches are): a thread moves one 4-byte word of each view (4 elements of
a channels_last row, or 4 pixels x 3 channels of an NCHW row) and packs its outputs into 8-byte
stores; the partner word is read only when a masked-out cell needs it, and the mask column of a
pixel comes from a cached (W,) table, so no integer division by W per element. The per-element
kernels below stay for every other shape (odd W, strided views); `vectorize=False` forces them.

Debugging: NUMBA_ENABLE_CUDASIM=1 (set before numba.cuda is imported) runs these kernels in the
simulator on the CPU -- slow, keep shapes tiny. uniform4_device is the RNG (kernels/rng.py) as a
device function, identical to the CPU and Python versions.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, uint32, uint64

from kernels.mix import Layout, bits_dtype, normalise_lut, plan
from kernels.rng import _uniform4

THREADS = 128  # threads per block (x) of the per-element kernels
VEC_THREADS = 256  # threads per block of the vectorised kernels (they walk rows, grid-stride)

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


@cuda.jit(device=True, inline=True)
def _byte(w0, w1, w2, b):
    # byte b (0..11) of the 12 little-endian bytes w0 | w1 << 32 | w2 << 64
    w = w0 if b < 4 else (w1 if b < 8 else w2)
    return (w >> (8 * (b & 3))) & 0xFF


@cuda.jit(device=True, inline=True)
def _shared_lut(lut):
    # the (768,) uint32 table (3 channels x 256 values) into shared memory, once per block
    lut_s = cuda.shared.array(768, dtype=uint32)
    for i in range(cuda.threadIdx.x, 768, cuda.blockDim.x):
        lut_s[i] = lut[i]
    cuda.syncthreads()
    return lut_s


@cuda.jit(device=True, inline=True)
def _pack(lo, hi, bits, t, wide):
    # element t (0..3) of a group into two uint64 words: four 16-bit values in lo, or 32-bit
    # values two in lo and two in hi
    if wide:
        if t < 2:
            lo |= uint64(bits) << uint64(32 * t)
        else:
            hi |= uint64(bits) << uint64(32 * (t - 2))
    else:
        lo |= uint64(bits) << uint64(16 * t)
    return lo, hi


@cuda.jit(device=True, inline=True)
def _row(r, H, R, gh, gw, per_sample, do_mix, perm):
    # row r = (sample j, line y) of the vectorised kernels: its mask cells' flat offset in masks and
    # the flat word offset of the partner's same row (R words a row)
    j = r // H
    y = r - j * H
    mrow = ((j if per_sample else 0) * gh + (y * gh) // H) * gw
    prow = ((perm[j] if do_mix else j) * H + y) * R
    return j, y, mrow, prow


@cuda.jit
def _nhwc_vec(v1w, v2w, masks, perm, colcell, lut, out1, out2, outm, N, H, gh, gw, per_sample,
              do_mix, wide):
    # Flat views: v1w, v2w (N*H*R,) uint32: the uint8 rows as words, R = 3W/4 a row; masks
    # (M*gh*gw,) uint8; perm (N,); colcell (W,) int32 = (x * gw) // W; lut (768,) uint32 =
    # output bits of value v in channel c at c * 256 + v; outX (N*H*R*(2 if wide else 1),) uint64.
    # A block walks rows (grid-stride), its threads the row's words: word k holds elements
    # e = 4k..4k+3 of the row, element e = channel e % 3 of pixel e // 3 (two pixels per word).
    lut_s = _shared_lut(lut)
    W = colcell.shape[0]
    R = 3 * W // 4
    for r in range(cuda.blockIdx.x, N * H, cuda.gridDim.x):
        j, y, mrow, prow = _row(r, H, R, gh, gw, per_sample, do_mix, perm)
        for k in range(cuda.threadIdx.x, R, cuda.blockDim.x):
            w = r * R + k
            a = v1w[w]
            b = v2w[w]
            x = (4 * k) // 3                    # pixel of element 0; elements c..c+3 of x, x+1
            c = 4 * k - 3 * x
            keep = 15                           # bit t: element t keeps its own pixel
            pa = a
            if do_mix:
                m0 = masks[mrow + colcell[x]]
                m1 = masks[mrow + colcell[x + 1]]
                keep = 0
                for t in range(4):
                    keep |= (m0 if c + t < 3 else m1) << t
                if keep != 15:
                    pa = v1w[prow + k]          # the partner's word only when a cell needs it
            lo1 = hi1 = lo2 = hi2 = uint64(0)
            c0 = c
            for t in range(4):
                base = 256 * c
                sh = 8 * t
                lo1, hi1 = _pack(lo1, hi1, lut_s[base + ((a >> sh) & 0xFF)], t, wide)
                lo2, hi2 = _pack(lo2, hi2, lut_s[base + ((b >> sh) & 0xFF)], t, wide)
                c = 0 if c == 2 else c + 1
            lom, hi_m = lo1, hi1                    # the whole word kept: the mixed view is x1
            if keep != 15:
                lom = hi_m = uint64(0)
                c = c0
                for t in range(4):
                    sh = 8 * t
                    mv = (a >> sh) & 0xFF if (keep >> t) & 1 else (pa >> sh) & 0xFF
                    lom, hi_m = _pack(lom, hi_m, lut_s[256 * c + mv], t, wide)
                    c = 0 if c == 2 else c + 1
            if wide:
                out1[2 * w] = lo1
                out1[2 * w + 1] = hi1
                out2[2 * w] = lo2
                out2[2 * w + 1] = hi2
                if do_mix:
                    outm[2 * w] = lom
                    outm[2 * w + 1] = hi_m
            else:
                out1[w] = lo1
                out2[w] = lo2
                if do_mix:
                    outm[w] = lom


@cuda.jit
def _nchw_vec(v1w, v2w, masks, perm, colcell, lut, out1, out2, outm, N, H, gh, gw, per_sample,
              do_mix, wide):
    # As _nhwc_vec, but outX (N*3*H*Q,) uint64 planes, Q = W/4 (W/2 if wide) words a plane row.
    # Thread step k = pixels 4k..4k+3: input words 3k..3k+2 of the row, one 8-byte store per
    # plane (two if wide).
    lut_s = _shared_lut(lut)
    W = colcell.shape[0]
    R = 3 * W // 4
    Q = W // 2 if wide else W // 4
    for r in range(cuda.blockIdx.x, N * H, cuda.gridDim.x):
        j, y, mrow, prow = _row(r, H, R, gh, gw, per_sample, do_mix, perm)
        for k in range(cuda.threadIdx.x, W // 4, cuda.blockDim.x):
            w = r * R + 3 * k
            a0 = v1w[w]
            a1 = v1w[w + 1]
            a2 = v1w[w + 2]
            b0 = v2w[w]
            b1 = v2w[w + 1]
            b2 = v2w[w + 2]
            keep = 15
            p0, p1, p2 = a0, a1, a2
            if do_mix:
                keep = 0
                for p in range(4):
                    keep |= masks[mrow + colcell[4 * k + p]] << p
                if keep != 15:
                    p0 = v1w[prow + 3 * k]
                    p1 = v1w[prow + 3 * k + 1]
                    p2 = v1w[prow + 3 * k + 2]
            for c in range(3):
                lo1 = hi1 = lo2 = hi2 = lom = hi_m = uint64(0)
                base = 256 * c
                for p in range(4):
                    bi = 3 * p + c
                    av = _byte(a0, a1, a2, bi)
                    lo1, hi1 = _pack(lo1, hi1, lut_s[base + av], p, wide)
                    lo2, hi2 = _pack(lo2, hi2, lut_s[base + _byte(b0, b1, b2, bi)], p, wide)
                    mv = av if (keep >> p) & 1 else _byte(p0, p1, p2, bi)
                    lom, hi_m = _pack(lom, hi_m, lut_s[base + mv], p, wide)
                o = ((j * 3 + c) * H + y) * Q + (2 * k if wide else k)
                out1[o] = lo1
                out2[o] = lo2
                if do_mix:
                    outm[o] = lom
                if wide:
                    out1[o + 1] = hi1
                    out2[o + 1] = hi2
                    if do_mix:
                        outm[o + 1] = hi_m


_CACHE: dict = {}  # (context id, what, ...) -> (pinned host array, device array): small tables


def _upload(key, make, stream):
    """A small constant table on the device, built on the host once per context and key and
    uploaded asynchronously on `stream` from pinned memory (the pinned copy is kept alive)."""
    key = (id(cuda.current_context()),) + key
    hit = _CACHE.get(key)
    if hit is None:
        arr = make()
        host = cuda.pinned_array(arr.shape, arr.dtype)
        host[...] = arr
        hit = _CACHE[key] = (host, cuda.to_device(host, stream=stream))
    return hit[1]


def device_lut(mean, std, kind, stream=0, wide32=False):
    """(3, 256) device table of normalised values in the output bits (zero-extended to uint32 for
    the vectorised kernels when wide32); cached per (context, mean, std, kind)."""
    mb, sb = np.asarray(mean, np.float32).tobytes(), np.asarray(std, np.float32).tobytes()

    def make():
        lut = normalise_lut(mean, std, kind)
        return lut.astype(np.uint32) if wide32 else lut
    return _upload(("lut", mb, sb, kind, wide32), make, stream)


def _colcell(W, gw, stream):
    return _upload(("colcell", W, gw), lambda: ((np.arange(W) * gw) // W).astype(np.int32), stream)


def _resident_blocks(threads: int) -> int:
    """Blocks that fill the GPU once (8 x 256-thread blocks per multiprocessor): enough warps in
    flight to hide memory latency, few enough that each block amortises its shared-table load."""
    try:
        sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    except Exception:  # the simulator has no device attributes
        sms = 1
    return sms * max(1, 2048 // threads)


def _ptr(a) -> int:
    cai = getattr(a, "__cuda_array_interface__", None)
    return cai["data"][0] if cai else a.ctypes.data  # the simulator's arrays are host arrays


def _vectorisable(v1, v2, outs, W) -> bool:
    if W % 4:
        return False
    if any(not a.is_c_contiguous() for a in (v1, v2, *outs)):
        return False
    return all(_ptr(v) % 4 == 0 for v in (v1, v2)) and all(_ptr(o) % 8 == 0 for o in outs)


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
                   layout: Layout = "channels_last", stream=0, vectorize: bool = True) -> None:
    """Enqueue the fused mix on `stream` (never synchronises). See the module docstring;
    vectorize=False forces the per-element kernels (the vectorised ones are used when they can be)."""
    v1, v2, masks, perm = (_device(n, a) for n, a in (("v1", v1), ("v2", v2), ("masks", masks), ("perm", perm)))
    out1, out2, outm = (_device(n, a) for n, a in (("out1", out1), ("out2", out2), ("outm", outm)))
    p = plan(v1, v2, masks, perm, out1, out2, outm, layout)
    if p.N == 0 or p.H == 0 or p.W == 0:
        return
    outs = [o for o in (out1, out2, outm) if o is not None]
    if vectorize and _vectorisable(v1, v2, outs, p.W):
        _launch_vec(v1, v2, masks, perm, mean, std, out1, out2, outm, p, stream)
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


def _launch_vec(v1, v2, masks, perm, mean, std, out1, out2, outm, p, stream) -> None:
    N, H, W = p.N, p.H, p.W
    wide = p.kind == "float32"
    do_mix = p.M > 0
    if not do_mix:                                       # typed placeholders, never read
        masks = _upload(("ones",), lambda: np.ones((1, 1, 1), np.uint8), stream)
        perm = _upload(("perm0",), lambda: np.zeros(1, np.int64), stream)
        outm = out1
    gh, gw = int(masks.shape[1]), int(masks.shape[2])
    colcell = _colcell(W, gw, stream)
    lut = device_lut(mean, std, p.kind, stream, wide32=True).reshape(768)

    def flat(a, dtype):  # C-contiguous buffer -> 1-D view of `dtype` words
        return a.reshape(a.size).view(dtype)
    bits = bits_dtype(p.kind)
    o1, o2, om = (flat(o.view(bits), np.uint64) for o in (out1, out2, outm))
    width = W // 4 if p.nchw else 3 * W // 4              # thread steps per row
    threads = min(VEC_THREADS, 32 * math.ceil(width / 32))
    blocks = min(N * H, _resident_blocks(threads))       # grid-stride over the N*H rows
    kernel = _nchw_vec if p.nchw else _nhwc_vec
    kernel[blocks, threads, stream](flat(v1, np.uint32), flat(v2, np.uint32), flat(masks, np.uint8),
                                    perm, colcell, lut, o1, o2, om, N, H, gh, gw, p.M > 1, do_mix,
                                    wide)
