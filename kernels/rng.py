"""Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11, "Parallel random numbers:
as easy as 1, 2, 3"), used by the MixMask mask samplers (Vishniakov et al., arXiv 2210.11456).

A draw is a pure function of its keys, so results do not depend on thread count, call order or
backend (plain Python, ``numba.njit``, ``numba.cuda`` device code):

    key     = (seed mod 2**32, seed div 2**32)                  # 2 x 32-bit words
    counter = (counter, sample_index, batch_index, epoch)       # 4 x 32-bit words, each mod 2**32
    (w0, w1, w2, w3) = Philox4x32-10(counter, key)
    u_i = w_i / 2**32                                           # 4 uniforms in [0, 1), exact float64

Arithmetic: every word lives in a uint64 but holds only 32 bits, so the 32 x 32 -> 64-bit products
of Philox never overflow. That makes the same source exact with Python ints, numpy uint64 scalars
(no overflow warnings), numba uint64 and CUDA uint64; all constants are np.uint64 so numba never
mixes signed and unsigned operands (which it would promote to float64).

Streams: one sample's draws for different purposes never share a counter. The counter word is
stream * 2**STREAM_SHIFT + call (calls < 2**24 per stream and sample); STREAMS names them. Stream 0
is the MixMask grid sampler (kernels/masks.py), whose counters start at 0.

Checked against the Random123 known-answer vectors (tests/kernels/test_rng.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit

# Philox4x32 multipliers and Weyl key increments (Random123).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_INV_2_32 = 2.0 ** -32  # word -> [0, 1)

ROUNDS = 10

STREAM_SHIFT = 24
STREAMS = {
    "mixmask": 0,     # kernels/masks.py grid masks
    "noise": 1,       # kernels/fill.py noise of the masked query view
    "hard_noise": 2,  # kernels/fill.py noise of the hard negative
    "cells": 3,       # kernels/cells.py erase/saliency cell masks and focal windows
    "hard_cells": 4,  # kernels/cells.py hard-negative cell masks
    "batch": 5,       # per-batch draws: Un-Mix lam/box, random permutations (mixmask/mixing)
    "tokens": 6,      # kernels/tokens.py kept tokens of masked image modelling (CMAE)
}


def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on four counter words and two key words (uint64 holding 32 bits each).

    Returns the four 32-bit output words (as uint64). Backend-neutral source: compiled below with
    njit, with cuda.jit(device=True) in kernels/mix_cuda.py, or run as Python.
    """
    for _ in range(ROUNDS):
        p0 = _M0 * c0  # < 2**64: 32 x 32-bit product, no overflow
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32,
                          (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32)
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _uniform4(seed, epoch, batch_index, sample_index, counter):
    """Four uniforms in [0, 1) (float64) for the key tuple; see the module docstring.

    Pass seed as np.uint64 from Python (numba types a Python int as int64, which holds only
    seeds < 2**63). The Philox rounds are repeated inline (rather than calling _philox4x32) so this one function
    compiles unchanged for the CPU (njit) and as a CUDA device function.
    """
    s = np.uint64(seed)
    k0 = s & _MASK32
    k1 = s >> _SHIFT32
    c0 = np.uint64(counter) & _MASK32
    c1 = np.uint64(sample_index) & _MASK32
    c2 = np.uint64(batch_index) & _MASK32
    c3 = np.uint64(epoch) & _MASK32
    for _ in range(ROUNDS):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32,
                          (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32)
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return (float(c0) * _INV_2_32, float(c1) * _INV_2_32,
            float(c2) * _INV_2_32, float(c3) * _INV_2_32)


# Compiled CPU twins (NUMBA_DISABLE_JIT=1 turns these back into the Python functions above).
philox4x32 = njit(nogil=True)(_philox4x32)
uniform4 = njit(nogil=True)(_uniform4)


# ---------------------------------------------------------------------------------------------
# Plain-Python reference (Python ints, explicit masking), written from the Random123 definition.

def philox4x32_reference(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 with Python ints: counter (4 words), key (2 words) -> 4 words."""
    m32 = 0xFFFFFFFF
    c = [int(w) & m32 for w in counter]
    k = [int(w) & m32 for w in key]
    for r in range(ROUNDS):
        if r:  # key schedule: bump before every round but the first
            k = [(k[0] + 0x9E3779B9) & m32, (k[1] + 0xBB67AE85) & m32]
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & m32, p1 & m32, ((p0 >> 32) ^ c[3] ^ k[1]) & m32, p0 & m32]
    return tuple(c)


def uniform4_reference(seed: int, epoch: int, batch_index: int, sample_index: int,
                       counter: int) -> tuple[float, float, float, float]:
    """Python-int reference of uniform4 (same key layout)."""
    seed = int(seed)
    words = philox4x32_reference((counter, sample_index, batch_index, epoch),
                                 (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    return tuple(w / 2.0 ** 32 for w in words)
