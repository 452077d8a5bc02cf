"""Fused MixMask mix + normalise + convert, CPU (numba njit, parallel) and its numpy reference.

MixMask (Vishniakov, Xing, Shen, arXiv 2210.11456), docs/methods.md §2: with a binary grid mask
M_j (g x g, upsampled nearest-neighbour) and a partner permutation perm,

    out1[j] = (v1[j] - mean) / std
    out2[j] = (v2[j] - mean) / std
    outm[j] = (where(up(M_j) == 1, v1[j], v1[perm[j]]) - mean) / std

in float32, then rounded to the output dtype (float32, float16, or bfloat16 by round-to-nearest-
even, bit-identical to torch's .to(torch.bfloat16)). Mixing the uint8 pixels and then normalising is
exact because the mask is binary (docs/methods.md §2); view 2 and x1 stay clean.
Upsampling is DEFINED as cell_row(y) = (y * gh) // H, cell_col(x) = (x * gw) // W (integer
arithmetic, cells need not divide the image), the same rule as kernels.masks.realised_lam.

Buffers (all C-contiguous, preallocated by the caller):
    v1, v2      (N, H, W, 3) uint8, NHWC as the loaders produce them
    masks       (M, gh, gw) uint8, M in {1, N} (one mask per batch or per sample), or None (no mix)
    perm        (N,) int64, perm[j] = index of the image that fills outm[j]
    mean, std   (3,) float32 in uint8 pixel units (e.g. 0.485 * 255)
    out1, out2, outm: dtype float32 | float16 | bfloat16-as-uint16/int16 bits (numpy has no bf16;
                the torch caller views the buffer as torch.bfloat16);
                layout "channels_last": (N, H, W, 3) -- the memory of a channels_last NCHW tensor
                layout "nchw":          (N, 3, H, W)
How the CPU kernel gets near memory speed (benchmarks/kernels.py measures it):
- prange over chunks of (sample, row) pairs (dynamic scheduling); per row, each output row is
  computed into a small scratch row in L1, vectorised by LLVM (16 lanes: u8 -> f32, normalise,
  round to f16/bf16 bits), then streamed to the output with non-temporal 64-byte stores (no
  read-for-ownership of the output lines, so writes cost one memory pass, not two), and the next
  row is computed while those stores drain;
- normalise uses the cheapest of fma(v, 1/std, -mean/std), (v - mean) * (1/std) and the IEEE
  divide that gives the divide's output bits for all 256 x 3 inputs (checked exhaustively per
  mean/std/dtype, see fast_form: ImageNet statistics get fma for f16/bf16, the divide for f32);
- the mixed row reuses out1's row: branch-free select between it and the partner's values; a row
  whose cells are all kept is out1's row, stored again without reading the partner;
- the upsampled mask row is rebuilt only when (mask, cell row) changes (every ~H/g rows);
- no per-element branches, no full-size float intermediate, no array views inside the loops
  (numba reference-counts views; that alone made a first version 10x slower).
Exactness: the compiled normalisation, f16 conversion (LLVM fptrunc) and bf16 rounding give the
same bits as the numpy reference (and torch); tests compare every dtype/layout/form bit for bit.
The CUDA twin (kernels/mix_cuda.py) looks values up in normalise_lut's table instead.

Debugging: NUMBA_DISABLE_JIT=1 runs this kernel as plain Python (prange acts as range, and the
building blocks encode/stream_store/store_fence run their Python bodies instead of the compiled
intrinsics); _mix_rows.py_func(...) does the same for one call in-process.
"""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import numpy as np
from llvmlite import ir
from numba import config, get_num_threads, get_parallel_chunksize, njit, prange, set_parallel_chunksize, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

Layout = Literal["channels_last", "nchw"]
OutKind = Literal["float32", "float16", "bfloat16"]


# ---------------------------------------------------------------------------------------------
# Dtype helpers (numpy only; shared with kernels/mix_cuda.py)

def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 -> bfloat16 to nearest-even; returns the bf16 bit patterns as uint16.

    Same rule as torch (c10 round_to_nearest_even): NaN -> 0x7FC0, otherwise
    (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, which also rounds overflow to +-inf.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def bfloat16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    """Exact widening of bf16 bit patterns (uint16/int16) to float32 (for tests and debugging)."""
    return (np.asarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def out_kind(dtype) -> OutKind:
    """Output dtype of a buffer: float32, float16, or bfloat16 when it holds uint16/int16 bits."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "float32"
    if dtype == np.float16:
        return "float16"
    if dtype in (np.dtype(np.uint16), np.dtype(np.int16)):
        return "bfloat16"
    raise TypeError(f"output buffers must be float32, float16 or uint16/int16 (bfloat16 bits), got {dtype}")


def bits_dtype(kind: OutKind) -> np.dtype:
    return np.dtype(np.uint32) if kind == "float32" else np.dtype(np.uint16)


def _cast(x32: np.ndarray, kind: OutKind) -> np.ndarray:
    """float32 values -> output dtype (bf16 as uint16 bits), round-to-nearest-even."""
    if kind == "float32":
        return x32.astype(np.float32)
    if kind == "float16":
        with np.errstate(over="ignore"):  # |x| > 65504 rounds to +-inf (IEEE, like torch)
            return x32.astype(np.float16)
    return float32_to_bfloat16_bits(x32)


def normalise_lut(mean, std, kind: OutKind) -> np.ndarray:
    """(3, 256) table lut[c, v] = bits of cast((v - mean[c]) / std[c]) in float32 math.

    dtype uint32 (float32 bits) or uint16 (float16 / bfloat16 bits): the CUDA kernels only move
    bits (a table lookup is exact by construction and cheap from GPU L1).
    """
    mean, std = _mean_std(mean, std)
    values = (np.arange(256, dtype=np.float32)[None, :] - mean[:, None]) / std[:, None]  # (3, 256)
    return np.ascontiguousarray(_cast(values.astype(np.float32), kind)).view(bits_dtype(kind))


def _mean_std(mean, std):
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std must have 3 entries, got {mean.shape}, {std.shape}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std != 0).all()):
        raise ValueError(f"mean/std must be finite and std non-zero, got {mean}, {std}")
    return mean, std


# ---------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: shared by the CPU, reference and CUDA entry points)

class Plan(NamedTuple):
    N: int
    H: int
    W: int
    M: int        # number of masks (0 = masking off)
    kind: OutKind
    nchw: bool


def plan(v1, v2, masks, perm, out1, out2, outm, layout: Layout) -> Plan:
    """Validate shapes/dtypes of the fused-mix arguments (numpy or CUDA arrays)."""
    if layout not in ("channels_last", "nchw"):
        raise ValueError(f"layout must be 'channels_last' or 'nchw', got {layout!r}")
    if len(v1.shape) != 4 or v1.shape[3] != 3 or tuple(v2.shape) != tuple(v1.shape):
        raise ValueError(f"v1, v2 must both be (N, H, W, 3), got {v1.shape}, {v2.shape}")
    if np.dtype(v1.dtype) != np.uint8 or np.dtype(v2.dtype) != np.uint8:
        raise TypeError(f"v1, v2 must be uint8, got {v1.dtype}, {v2.dtype}")
    N, H, W, _ = (int(s) for s in v1.shape)
    want = (N, H, W, 3) if layout == "channels_last" else (N, 3, H, W)
    outs = [("out1", out1), ("out2", out2)] + ([("outm", outm)] if masks is not None else [])
    for name, o in outs:
        if o is None:
            raise ValueError(f"{name} is required")
        if tuple(o.shape) != want:
            raise ValueError(f"{name} must be {want} for layout {layout!r}, got {tuple(o.shape)}")
    kind = out_kind(out1.dtype)
    if any(np.dtype(o.dtype) != np.dtype(out1.dtype) for _, o in outs):
        raise TypeError("out1, out2, outm must share one dtype")
    M = 0
    if masks is not None:
        if len(masks.shape) != 3 or int(masks.shape[0]) not in (1, N) or min(masks.shape) < 1:
            raise ValueError(f"masks must be (1 or N={N}, gh, gw), got {masks.shape}")
        if np.dtype(masks.dtype) != np.uint8:
            raise TypeError(f"masks must be uint8, got {masks.dtype}")
        if perm is None or tuple(perm.shape) != (N,) or np.dtype(perm.dtype) != np.int64:
            raise ValueError(f"perm must be (N={N},) int64")
        M = int(masks.shape[0])
    return Plan(N, H, W, M, kind, layout == "nchw")


def cell_starts(g: int, W: int) -> np.ndarray:
    """(g + 1,) first pixel of each cell along an axis of W pixels: ceil(c W / g), c = 0..g."""
    c = np.arange(g + 1, dtype=np.int64)
    return (c * W + g - 1) // g


# ---------------------------------------------------------------------------------------------
# CPU building blocks. Each is a plain Python function (what runs under NUMBA_DISABLE_JIT=1 or via
# py_func) with a compiled twin registered by @overload; they live in this file so that
# cache=True re-compiles _mix_rows whenever any of them changes (numba keys its cache on the
# kernel's source file only).

def encode(x, o):
    """float32 value x -> an element of the output bit view o, rounded to nearest-even.

    o.dtype selects the output type: float32 (itself), int16 (float16 bits), uint16 (bfloat16 bits).
    x must not be NaN (the kernel's values never are: see prepare_cpu); bfloat16 then follows
    float32_to_bfloat16_bits without its NaN branch (which costs ~25% of the bf16 loop).
    """
    x = np.float32(x)
    if o.dtype == np.float32:
        return x
    if o.dtype == np.int16:
        with np.errstate(over="ignore"):  # overflow rounds to +-inf, as in the compiled twin
            return np.float16(x).view(np.int16)
    b = int(x.view(np.uint32))
    return np.uint16(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF)


def normalise(v, k, mean_row, std_row, fast):
    """(v - mean) / std in float32 for element k of a row (mean_row, std_row: (W*3,)).

    fast selects a cheaper form of the same function (an IEEE divide is what bounds the CPU
    kernel); prepare_cpu passes one only when it gives the same output bits for all 256 x 3
    possible inputs, checked exhaustively with the compiled code (fast_form):
      None        (v - mean) / std
      (W*3,)      (v - mean) * fast[k],             fast = 1 / std
      (2, W*3)    fma(v, fast[0, k], fast[1, k]),   fast = (1 / std, -mean / std)
    The plain-Python twin computes the division in every case: same bits, by that check.
    """
    x = np.float32(v) - mean_row[k]
    if fast is not None and fast.ndim == 1:
        return np.float32(x * fast[k])
    return np.float32(x / std_row[k])


def fma32(a, b, c):
    """float32 fused multiply-add a * b + c (one rounding). Compiled only (llvm.fma.f32)."""
    raise NotImplementedError("fma32 runs only compiled (numba JIT enabled)")


def stream_store(dst, j, i, offset, src):
    """dst[j, i, offset:offset + len(src)] = src, dst 3-D with a contiguous last axis.

    Compiled: non-temporal (streaming, cache-bypassing) 64-byte stores for the aligned body, so
    the output lines are never read from memory before being overwritten (no read-for-ownership:
    the write traffic halves); bytes before the first / after the last whole 64-byte line get an
    ordinary copy (torch's CPU allocator aligns to 64 bytes, so rows of 64-byte multiples have
    none). Call store_fence() before the data is handed to another thread.
    """
    dst[j, i, offset:offset + src.shape[0]] = src


def store_fence():
    """Order the streaming stores before anything that follows (compiled: a seq_cst fence)."""


@intrinsic
def _f16_bits(typingctx, x):
    """float32 -> IEEE half bits (LLVM fptrunc: round to nearest-even; F16C vcvtps2ph on x86)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(types.float32), codegen


@intrinsic
def _bf16_bits(typingctx, x):
    """float32 -> bfloat16 bits, round to nearest-even, in 32-bit lanes (x not NaN; see encode)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(b, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        r = builder.lshr(builder.add(builder.add(b, ir.Constant(i32, 0x7FFF)), lsb), ir.Constant(i32, 16))
        return builder.trunc(r, ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _stream_store(typingctx, dst, j, i, offset, src):
    ok = (isinstance(dst, types.Array) and dst.ndim == 3 and isinstance(src, types.Array)
          and src.ndim == 1 and dst.dtype == src.dtype
          and all(isinstance(t, types.Integer) for t in (j, i, offset)))
    if not ok:
        return None

    def codegen(context, builder, signature, args):
        dty, jty, ity, oty, sty = signature.args
        i64 = ir.IntType(64)
        i8p = ir.IntType(8).as_pointer()
        d = context.make_array(dty)(context, builder, args[0])
        s = context.make_array(sty)(context, builder, args[4])
        itemsize = context.get_abi_sizeof(context.get_data_type(dty.dtype))
        jv, iv, ov = (context.cast(builder, a, t, types.int64) for a, t in zip(args[1:4], (jty, ity, oty)))
        st0, st1, _ = cgutils.unpack_tuple(builder, d.strides, 3)
        off = builder.add(builder.add(builder.mul(jv, st0), builder.mul(iv, st1)),
                          builder.mul(ov, ir.Constant(i64, itemsize)))
        dptr = builder.gep(builder.bitcast(d.data, i8p), [off])
        sptr = builder.bitcast(s.data, i8p)
        nbytes = builder.mul(builder.extract_value(s.shape, 0), ir.Constant(i64, itemsize))
        zero = ir.Constant(i64, 0)

        def plain_copy(doff, soff, n):  # ordinary copy of n bytes (skipped when n == 0)
            with builder.if_then(builder.icmp_unsigned("!=", n, zero)):
                cgutils.raw_memcpy(builder, builder.gep(dptr, [doff]), builder.gep(sptr, [soff]), n, 1)

        # head: the bytes before the first 64-byte boundary (none for 64-byte aligned rows)
        head = builder.and_(builder.sub(zero, builder.ptrtoint(dptr, i64)), ir.Constant(i64, 63))
        head = builder.select(builder.icmp_unsigned("<", head, nbytes), head, nbytes)
        plain_copy(zero, zero, head)
        # body: whole aligned 64-byte lines, streaming stores
        nblk = builder.lshr(builder.sub(nbytes, head), ir.Constant(i64, 6))
        vptr = ir.VectorType(ir.IntType(8), 64).as_pointer()
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, nblk) as loop:
            o = builder.add(head, builder.shl(loop.index, ir.Constant(i64, 6)))
            v = builder.load(builder.bitcast(builder.gep(sptr, [o]), vptr), align=1)
            st = builder.store(v, builder.bitcast(builder.gep(dptr, [o]), vptr), align=64)
            st.set_metadata("nontemporal", nontemporal)
        # tail: what is left after the last whole line
        end = builder.add(head, builder.shl(nblk, ir.Constant(i64, 6)))
        plain_copy(end, end, builder.sub(nbytes, end))
        return context.get_dummy_value()
    return types.void(dst, j, i, offset, src), codegen


@intrinsic
def _fence(typingctx):
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")  # x86: mfence, which also drains write-combining buffers
        return context.get_dummy_value()
    return types.void(), codegen


@overload(encode, inline="always")
def _encode_jit(x, o):
    if o.dtype == types.float32:
        return lambda x, o: np.float32(x)
    if o.dtype == types.int16:
        return lambda x, o: _f16_bits(np.float32(x))
    if o.dtype == types.uint16:
        return lambda x, o: _bf16_bits(np.float32(x))


@overload(normalise, inline="always")
def _normalise_jit(v, k, mean_row, std_row, fast):
    # the form is chosen at compile time from fast's type: one specialisation per form
    if isinstance(fast, types.NoneType):
        return lambda v, k, mean_row, std_row, fast: (np.float32(v) - mean_row[k]) / std_row[k]
    if isinstance(fast, types.Array) and fast.ndim == 1:
        return lambda v, k, mean_row, std_row, fast: (np.float32(v) - mean_row[k]) * fast[k]
    if isinstance(fast, types.Array) and fast.ndim == 2:
        return lambda v, k, mean_row, std_row, fast: _fma32(np.float32(v), fast[0, k], fast[1, k])


@overload(fma32, inline="always")
def _fma32_jit(a, b, c):
    return lambda a, b, c: _fma32(np.float32(a), np.float32(b), np.float32(c))


@overload(stream_store, inline="always")
def _stream_store_jit(dst, j, i, offset, src):
    return lambda dst, j, i, offset, src: _stream_store(dst, j, i, offset, src)


@overload(store_fence, inline="always")
def _store_fence_jit():
    return lambda: _fence()


# ---------------------------------------------------------------------------------------------
# CPU kernel

@njit(nogil=True, cache=True, inline="always")
def _store_row(out, j, y, row, planes, nchw):
    """Stream row (W*3,) of interleaved channels into row y of sample j of out: (N, H, W*3) for
    channels_last, or (N, 3, H*W) for nchw, de-interleaved through planes (3, W) in one pass."""
    if not nchw:
        stream_store(out, j, y, 0, row)
    else:
        W = planes.shape[1]
        p0 = planes[0]
        p1 = planes[1]
        p2 = planes[2]
        for x in range(W):
            p0[x] = row[3 * x]
            p1[x] = row[3 * x + 1]
            p2[x] = row[3 * x + 2]
        stream_store(out, j, 0, y * W, p0)
        stream_store(out, j, 1, y * W, p1)
        stream_store(out, j, 2, y * W, p2)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _mix_rows(v1, v2, masks, perm, mean_row, std_row, fast, cell_col, out1, out2, outm, nchw, do_mix,
              nchunks):
    """prange over chunks of (sample j, row y) pairs; per row: compute, then stream out.

    v1, v2 (N, H, W*3) uint8; masks (M, gh, gw) uint8; perm (N,) int64;
    mean_row, std_row (W*3,) float32: mean/std of the channel of each element of a row;
    fast: None, (W*3,) or (2, W*3) float32, the form of the normalisation, see normalise();
    cell_col (W*3,) int64: mask column of each element, (x * gw) // W;
    outX bit views: (N, H, W*3) for channels_last, (N, 3, H*W) for nchw.
    Error model "numpy": no zero-division check in the loop (std != 0 is checked up front), so
    LLVM vectorises every row loop (u8 -> f32, subtract, divide, convert, 16 lanes at a time).
    """
    N, H, W3 = v1.shape[0], v1.shape[1], v1.shape[2]
    W = W3 // 3
    M, gh = masks.shape[0], masks.shape[1]
    R = N * H
    for chunk in prange(nchunks):
        s1 = np.empty(W3, out1.dtype)   # (W*3,) this row of out1, interleaved channels
        s2 = np.empty(W3, out1.dtype)
        sm = np.empty(W3, out1.dtype)
        keep = np.zeros(W3, np.uint8)   # (W*3,) mask value of each element of the row
        planes = np.empty((3, W), out1.dtype)  # (3, W) the row split by channel (nchw)
        key = -1                         # (mask index, cell row) that keep holds
        kept = 0                         # number of ones in keep
        for t in range(chunk * R // nchunks, (chunk + 1) * R // nchunks):
            j = t // H
            y = t - j * H
            # each row is computed into L1 scratch and streamed out right away, so the stores of
            # one row drain while the next is computed (2x faster than computing all three first)
            for k in range(W3):
                s1[k] = encode(normalise(v1[j, y, k], k, mean_row, std_row, fast), s1)
            _store_row(out1, j, y, s1, planes, nchw)
            for k in range(W3):
                s2[k] = encode(normalise(v2[j, y, k], k, mean_row, std_row, fast), s2)
            _store_row(out2, j, y, s2, planes, nchw)
            if do_mix:
                mj = j if M > 1 else 0
                cr = (y * gh) // H
                if mj * gh + cr != key:  # the upsampled mask row changes every ~H/gh rows
                    key = mj * gh + cr
                    kept = 0
                    for k in range(W3):
                        keep[k] = masks[mj, cr, cell_col[k]]
                        kept += keep[k] != 0
                if kept == W3:  # the whole row is kept: outm's row is out1's
                    _store_row(outm, j, y, s1, planes, nchw)
                else:
                    pj = perm[j]
                    for k in range(W3):  # branch-free: partner computed, kept values from s1
                        xp = encode(normalise(v1[pj, y, k], k, mean_row, std_row, fast), sm)
                        sm[k] = s1[k] if keep[k] != 0 else xp
                    _store_row(outm, j, y, sm, planes, nchw)
        store_fence()


def _c_contiguous(name, a):
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (for a torch channels_last tensor t pass "
                         f"t.permute(0, 2, 3, 1).numpy())")


# bit views the CPU kernel writes through; the dtype tells encode() what to produce
_CPU_VIEW = {"float32": np.dtype(np.float32), "float16": np.dtype(np.int16), "bfloat16": np.dtype(np.uint16)}


@njit(nogil=True, cache=True, error_model="numpy")
def _forms(mean, std, inv, bias, o):
    """(3 forms, 3 channels, 256) encoded values of normalise()'s forms (division, multiply by
    1/std, fma), computed by the same compiled operations as the kernel; o selects the dtype."""
    out = np.empty((3, 3, 256), o.dtype)
    for c in range(3):
        for v in range(256):
            x = np.float32(v)
            out[0, c, v] = encode((x - mean[c]) / std[c], o)
            out[1, c, v] = encode((x - mean[c]) * inv[c], o)
            out[2, c, v] = encode(fma32(x, inv[c], bias[c]), o)
    return out


@functools.lru_cache(maxsize=64)
def fast_form(mean_bytes: bytes, std_bytes: bytes, kind: OutKind) -> str:
    """Cheapest form of normalise() that gives the division's output bits for every (v, channel):
    "fma", "mul" or "div". Exhaustive over the 768 inputs, so exact by construction; float32
    arithmetic has no fast-math or FMA contraction in the kernel. With ImageNet statistics:
    fma for float16 and bfloat16, div for float32 (cached per mean/std/dtype)."""
    mean = np.frombuffer(mean_bytes, np.float32)
    std = np.frombuffer(std_bytes, np.float32)
    inv = (np.float32(1) / std).astype(np.float32)
    x = np.arange(256, dtype=np.float32)[None, :] - mean[:, None]              # (3, 256)
    exact = _cast((x / std[:, None]).astype(np.float32), kind).view(_CPU_VIEW[kind])
    if np.isnan(x / std[:, None]).any():
        raise ValueError("mean/std give NaN normalised values")
    if config.DISABLE_JIT:  # plain Python: no compiled fma to check; numpy multiply is IEEE
        mul = _cast((x * inv[:, None]).astype(np.float32), kind).view(_CPU_VIEW[kind])
        return "mul" if np.array_equal(mul, exact) else "div"
    bias = (-mean / std).astype(np.float32)
    forms = _forms(mean, std, inv, bias, np.empty(1, _CPU_VIEW[kind]))
    if not np.array_equal(forms[0], exact):  # the compiled division is the reference: must agree
        raise RuntimeError("compiled normalisation differs from the numpy reference")
    for name, i in (("fma", 2), ("mul", 1)):
        if np.array_equal(forms[i], exact):
            return name
    return "div"


@functools.lru_cache(maxsize=64)
def _row_constants(mean_bytes: bytes, std_bytes: bytes, kind: OutKind, W: int, gw: int):
    """Per-row inputs of _mix_rows that depend only on (mean, std, dtype, W, gw), cached:
    mean_row, std_row (W*3,), normalise()'s fast form, cell_col (W*3,) = (x * gw) // W."""
    mean = np.frombuffer(mean_bytes, np.float32)
    std = np.frombuffer(std_bytes, np.float32)
    form = fast_form(mean_bytes, std_bytes, kind)
    inv = (np.float32(1) / std).astype(np.float32)
    if form == "fma":
        fast = np.stack([np.tile(inv, W), np.tile((-mean / std).astype(np.float32), W)])  # (2, W*3)
    elif form == "mul":
        fast = np.tile(inv, W)                                                           # (W*3,)
    else:
        fast = None
    cell_col = ((np.arange(3 * W, dtype=np.int64) // 3) * gw) // max(W, 1)               # (W*3,)
    return np.tile(mean, W), np.tile(std, W), fast, cell_col


def prepare_cpu(v1, v2, masks, perm, mean, std, out1, out2, outm=None, layout: Layout = "channels_last"):
    """Checked, reshaped arguments of _mix_rows (views only, no copies of images or outputs)."""
    p = plan(v1, v2, masks, perm, out1, out2, outm, layout)
    for name, a in (("v1", v1), ("v2", v2), ("out1", out1), ("out2", out2)) + ((("outm", outm),) if p.M else ()):
        _c_contiguous(name, a)
    mean, std = _mean_std(mean, std)
    N, H, W = p.N, p.H, p.W
    view = _CPU_VIEW[p.kind]
    oshape = (N, 3, H * W) if p.nchw else (N, H, W * 3)

    def out_view(o):
        return o.view(view).reshape(oshape)

    if p.M:
        masks = np.ascontiguousarray(masks)
        perm = np.ascontiguousarray(perm)
        if N and (perm.min() < 0 or perm.max() >= N):
            raise ValueError("perm entries must lie in [0, N)")
        o_m = out_view(outm)
        if np.may_share_memory(o_m, out1) or np.may_share_memory(o_m, out2):
            raise ValueError("outm must not overlap out1/out2 (x1 stays clean)")
    else:  # masking off: typed stand-ins, never read or written
        masks = np.ones((1, 1, 1), np.uint8)
        perm = np.zeros(max(N, 1), np.int64)
        o_m = out_view(out1)
    mean_row, std_row, fast, cell_col = _row_constants(mean.tobytes(), std.tobytes(), p.kind, W, masks.shape[2])
    nchunks = max(1, min(N * H, 8 * get_num_threads()))  # ~8 chunks per thread
    return (v1.reshape(N, H, W * 3), v2.reshape(N, H, W * 3), masks, perm, mean_row, std_row, fast,
            cell_col, out_view(out1), out_view(out2), o_m, p.nchw, bool(p.M), nchunks)


def fused_mix(v1, v2, masks, perm, mean, std, out1, out2, outm=None,
              layout: Layout = "channels_last") -> None:
    """Write normalised out1, out2 and the MixMask view outm in one parallel pass (CPU).

    Shapes and dtypes: see the module docstring; the output dtype is that of the out buffers.
    masks=None turns masking off (outm and perm are then ignored). Releases the GIL.
    """
    args = prepare_cpu(v1, v2, masks, perm, mean, std, out1, out2, outm, layout)
    if args[0].size:
        # dynamic scheduling of the chunks (a thread that gets preempted takes fewer); set here,
        # not with `with parallel_chunksize()` inside the kernel, which breaks cache=True
        previous = get_parallel_chunksize()
        set_parallel_chunksize(1)
        try:
            _mix_rows(*args)
        finally:
            set_parallel_chunksize(previous)


# ---------------------------------------------------------------------------------------------
# Plain numpy reference, straight from the formula: full-size float32 tensors, then cast.

def fused_mix_reference(v1, v2, masks, perm, mean, std, out1, out2, outm=None,
                        layout: Layout = "channels_last") -> None:
    """Reference twin of fused_mix (same arguments, same results, slow and simple)."""
    p = plan(v1, v2, masks, perm, out1, out2, outm, layout)
    mean, std = _mean_std(mean, std)

    def normalise(x):  # (N, H, W, 3) uint8 -> output buffer dtype/layout
        y = _cast((x.astype(np.float32) - mean) / std, p.kind)
        if p.nchw:
            y = y.transpose(0, 3, 1, 2)
        return y.view(out1.dtype) if p.kind == "bfloat16" else y

    out1[...] = normalise(np.asarray(v1))
    out2[...] = normalise(np.asarray(v2))
    if p.M:
        gh, gw = masks.shape[1], masks.shape[2]
        rows = (np.arange(p.H) * gh) // p.H                       # (H,) cell row of each pixel row
        cols = (np.arange(p.W) * gw) // p.W                       # (W,)
        up = np.asarray(masks)[:, rows][:, :, cols]               # (M, H, W) nearest upsampling
        up = np.broadcast_to(up, (p.N, p.H, p.W))[..., None]      # (N, H, W, 1)
        mixed = np.where(up == 1, v1, np.asarray(v1)[np.asarray(perm)])  # (N, H, W, 3) uint8
        outm[...] = normalise(mixed)
