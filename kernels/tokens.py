"""Random token masking of masked image modelling (MAE: He et al. 2021, arXiv 2111.06377; CMAE:
arXiv 2205.10546; docs/methods.md §8), drawn on the host per sample from the Philox stream "tokens".

    keep = keep_tokens(n, L, K, seed, epoch, batch_index)     (n, K) int64, each row ascending

Sample j gives every token l of its L = (H/p)(W/p) patches a priority
u_l = uniform4(seed, epoch, batch_index, j, STREAMS["tokens"] * 2**24 + l // 4)[l % 4] and keeps the K
tokens of lowest priority (MAE's argsort of uniform noise), K = int(L (1 - r)) for the mask ratio r.
The rows are returned in ascending patch order (the encoder adds positional embeddings before it
drops tokens, so the order carries no information). A pure function of its keys: the same on every
backend, thread count and resume.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.rng import STREAM_SHIFT, STREAMS, uniform4, uniform4_reference

TOKENS = STREAMS["tokens"] << STREAM_SHIFT


def kept_count(L: int, ratio: float) -> int:
    """K = int(L (1 - r)), at least 1: MAE's len_keep."""
    return max(1, int(L * (1.0 - ratio)))


@njit(nogil=True, cache=True)
def _keep_tokens(n, L, K, seed, epoch, batch_index, out):
    pri = np.empty(L, np.float64)
    for j in range(n):
        for c in range((L + 3) // 4):
            u0, u1, u2, u3 = uniform4(seed, epoch, batch_index, j, TOKENS + c)
            for q, u in enumerate((u0, u1, u2, u3)):
                if 4 * c + q < L:
                    pri[4 * c + q] = u
        order = np.argsort(pri, kind="mergesort")
        out[j] = np.sort(order[:K])


def keep_tokens(n: int, L: int, K: int, seed: int, epoch: int, batch_index: int) -> np.ndarray:
    """(n, K) int64: the kept patch indices of each sample, ascending."""
    if not 1 <= K <= L:
        raise ValueError(f"need 1 <= K <= L, got K={K}, L={L}")
    out = np.empty((n, K), np.int64)
    _keep_tokens(n, L, K, np.uint64(seed), epoch, batch_index, out)
    return out


def keep_tokens_reference(n: int, L: int, K: int, seed: int, epoch: int, batch_index: int) -> np.ndarray:
    """Plain-Python reference of keep_tokens (the Random123 reference generator, a stable sort)."""
    out = np.empty((n, K), np.int64)
    for j in range(n):
        pri = []
        for c in range((L + 3) // 4):
            pri.extend(uniform4_reference(seed, epoch, batch_index, j, TOKENS + c))
        order = sorted(range(L), key=lambda l: (pri[l], l))
        out[j] = sorted(order[:K])
    return out
