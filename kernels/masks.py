"""MixMask grid masks (Vishniakov, Xing, Shen, "MixMask: Revisiting Masking Strategy for Siamese
ConvNets", arXiv 2210.11456), docs/methods.md §2.

A mask is a binary g x g grid M, upsampled nearest-neighbour to the image; the mixed view is

    x~_j = M * x1_j + (1 - M) * x1_perm(j)          (1 = keep x1_j, 0 = take the partner)

and the loss weight is the REALISED kept fraction lam_j = mean(upsample(M_j)) (realised_lam).

Generators (each sample s of a call draws from its own Philox stream,
keys (seed, epoch, batch_index, s, counter), see kernels/rng.py):
- "block" (BEiT's MaskingGenerator, Bao et al. 2021): the masked (0) cells target
  int(ratio * g * g); repeatedly add a rectangle of area U(4, remaining) cells, aspect
  exp(U(log 0.3, log 1/0.3)), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)),
  h, w < g, top/left uniform; accept it when it newly covers 0 < d <= remaining cells; up to 10
  tries per rectangle; stop when a rectangle adds nothing. It may under-fill (even return an
  all-ones mask at small g): lam is measured afterwards. Terminates: every accepted rectangle
  strictly increases the covered count, which never exceeds the target.
  One Philox call (4 uniforms: area, aspect, top, left) per try; round() is floor(x + 0.5).
- "discrete": every cell masked (0) independently with probability ratio (kept with 1 - ratio);
  all-0 and all-1 grids are rejected and redrawn with the next counter values. After
  DISCRETE_MAX_DRAWS rejected draws (only reachable for extreme ratios, e.g. P(reject) > 0.9)
  one cell of the last draw, chosen by the next uniform, is flipped, so the call always terminates.

One mask per batch (the paper): n=1 (sample index 0). One mask per sample: n=N.
Masks are tiny (N x g x g): sampled on the CPU, then shipped with the batch.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numba import njit

from kernels.rng import uniform4, uniform4_reference

MaskKind = Literal["block", "discrete"]

BLOCK_MIN_CELLS = 4          # BEiT min_num_patches
BLOCK_MIN_ASPECT = 0.3       # BEiT min_aspect; max_aspect = 1 / min_aspect
BLOCK_TRIES = 10             # placement tries per rectangle (BEiT)
DISCRETE_MAX_DRAWS = 64      # rejection draws before the terminating fallback


# ---------------------------------------------------------------------------------------------
# Compiled samplers. NUMBA_DISABLE_JIT=1 runs them as plain Python (njit returns the function).

@njit(nogil=True)
def _block_masks(out, ratio, seed, epoch, batch_index):
    """Fill out (n, g, g) uint8 with BEiT block masks; 1 = keep, 0 = masked (from the partner)."""
    n, g = out.shape[0], out.shape[1]
    target = int(ratio * g * g)
    log_lo = math.log(BLOCK_MIN_ASPECT)
    log_hi = math.log(1.0 / BLOCK_MIN_ASPECT)
    for s in range(n):
        m = out[s]  # (g, g) view
        m[:, :] = 1
        covered = 0  # number of 0 cells
        ctr = 0
        while covered < target:
            remaining = target - covered
            delta = 0
            for _try in range(BLOCK_TRIES):
                u0, u1, u2, u3 = uniform4(seed, epoch, batch_index, s, ctr)
                ctr += 1
                area = BLOCK_MIN_CELLS + (remaining - BLOCK_MIN_CELLS) * u0
                aspect = math.exp(log_lo + (log_hi - log_lo) * u1)
                h = int(math.floor(math.sqrt(area * aspect) + 0.5))
                w = int(math.floor(math.sqrt(area / aspect) + 0.5))
                if h < g and w < g:
                    top = min(int(u2 * (g - h + 1)), g - h)
                    left = min(int(u3 * (g - w + 1)), g - w)
                    new = 0
                    for i in range(top, top + h):
                        for k in range(left, left + w):
                            if m[i, k] != 0:  # not yet masked (no uint8 arithmetic: plain-Python safe)
                                new += 1
                    if 0 < new <= remaining:
                        for i in range(top, top + h):
                            for k in range(left, left + w):
                                m[i, k] = 0
                        delta = new
                if delta > 0:
                    break
            if delta == 0:
                break
            covered += delta


@njit(nogil=True)
def _discrete_masks(out, ratio, seed, epoch, batch_index):
    """Fill out (n, g, g) uint8 with i.i.d. cells, P(0) = ratio, rejecting all-0 / all-1 grids."""
    n, g = out.shape[0], out.shape[1]
    cells = g * g
    per_draw = (cells + 3) // 4  # Philox calls per draw (4 uniforms each)
    for s in range(n):
        flat = out[s].reshape(cells)  # (g*g,) view
        ones = 0
        for draw in range(DISCRETE_MAX_DRAWS):
            ones = 0
            for b in range(per_draw):
                u = uniform4(seed, epoch, batch_index, s, draw * per_draw + b)
                for q in range(4):
                    c = 4 * b + q
                    if c < cells:
                        keep = 1 if u[q] >= ratio else 0
                        flat[c] = keep
                        ones += keep
            if 0 < ones < cells:
                break
        if ones == 0 or ones == cells:  # fallback: flip one cell of the last draw
            u0 = uniform4(seed, epoch, batch_index, s, DISCRETE_MAX_DRAWS * per_draw)[0]
            c = min(int(u0 * cells), cells - 1)
            flat[c] = 1 - flat[c]


def _check(kind: str, n: int, g: int, ratio: float, seed: int, epoch: int, batch_index: int) -> None:
    if kind not in ("block", "discrete"):
        raise ValueError(f"mask kind must be 'block' or 'discrete', got {kind!r}")
    if n < 1 or g < 1:
        raise ValueError(f"need n >= 1 and g >= 1, got n={n}, g={g}")
    if min(seed, epoch, batch_index) < 0 or seed >= 2 ** 64:
        raise ValueError("seed, epoch and batch_index must be non-negative (seed < 2**64)")
    if kind == "discrete":
        if g * g < 2:
            raise ValueError(f"discrete masks need g*g >= 2 (got g={g}): no grid is neither all-0 nor all-1")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"discrete masks need 0 < ratio < 1, got {ratio}")
    elif not 0.0 <= ratio <= 1.0:
        raise ValueError(f"block masks need 0 <= ratio <= 1, got {ratio}")


def sample_masks(kind: MaskKind, n: int, g: int, ratio: float, seed: int, epoch: int,
                 batch_index: int) -> np.ndarray:
    """Draw n grid masks -> (n, g, g) uint8, 1 = keep the pixel of x1[j], 0 = take x1[perm[j]].

    kind: "block" or "discrete"; ratio: nominal masked fraction r (paper default 0.5, g=8 at 224);
    (seed, epoch, batch_index, sample index 0..n-1) key the random stream: same keys, same masks.
    """
    n, g, ratio = int(n), int(g), float(ratio)
    seed, epoch, batch_index = int(seed), int(epoch), int(batch_index)
    _check(kind, n, g, ratio, seed, epoch, batch_index)
    out = np.empty((n, g, g), np.uint8)  # (n, g, g)
    fn = _block_masks if kind == "block" else _discrete_masks
    # fixed argument types (seed uint64: all 64 bits usable) -> one compiled specialisation
    fn(out, ratio, np.uint64(seed), np.int64(epoch), np.int64(batch_index))
    return out


def realised_lam(masks: np.ndarray, H: int, W: int) -> np.ndarray:
    """Kept fraction of each mask after nearest-neighbour upsampling to H x W -> (M,) float32.

    Upsampling is DEFINED as cell_row(y) = (y * gh) // H, cell_col(x) = (x * gw) // W (integer
    arithmetic; cells need not divide the image), so with rows_i = #{y : cell_row(y) = i} and
    cols_k = #{x : cell_col(x) = k}:   lam_m = sum_ik masks[m, i, k] rows_i cols_k / (H W), exact.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, g, g), got shape {masks.shape}")
    _, gh, gw = masks.shape
    H, W = int(H), int(W)
    if H < 1 or W < 1:
        raise ValueError(f"need H, W >= 1, got {H}x{W}")
    rows = np.bincount((np.arange(H, dtype=np.int64) * gh) // H, minlength=gh)  # (gh,)
    cols = np.bincount((np.arange(W, dtype=np.int64) * gw) // W, minlength=gw)  # (gw,)
    kept = np.einsum("mik,i,k->m", (masks != 0).astype(np.int64), rows, cols)   # (M,) exact ints
    return (kept / float(H * W)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Plain numpy references, written from the generator descriptions (BEiT's code shape) with the
# same random stream; the compiled samplers must reproduce them exactly.

def sample_masks_reference(kind: MaskKind, n: int, g: int, ratio: float, seed: int, epoch: int,
                           batch_index: int) -> np.ndarray:
    """Reference twin of sample_masks -> (n, g, g) uint8."""
    _check(kind, n, g, ratio, seed, epoch, batch_index)
    out = np.empty((n, g, g), np.uint8)
    for s in range(n):
        rand = _Stream(seed, epoch, batch_index, s)
        out[s] = _block_reference(g, ratio, rand) if kind == "block" else _discrete_reference(g, ratio, rand)
    return out


class _Stream:
    """Consecutive Philox calls of one sample: next4() -> 4 uniforms, counter 0, 1, 2, ..."""

    def __init__(self, seed, epoch, batch_index, sample_index):
        self.keys = (seed, epoch, batch_index, sample_index)
        self.counter = 0

    def next4(self):
        u = uniform4_reference(*self.keys, self.counter)
        self.counter += 1
        return u


def _block_reference(g: int, ratio: float, rand: _Stream) -> np.ndarray:
    target = int(ratio * g * g)
    masked = np.zeros((g, g), dtype=bool)  # BEiT convention: True = masked
    lo, hi = math.log(BLOCK_MIN_ASPECT), math.log(1 / BLOCK_MIN_ASPECT)
    count = 0
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(BLOCK_TRIES):
            u_area, u_aspect, u_top, u_left = rand.next4()
            area = BLOCK_MIN_CELLS + (remaining - BLOCK_MIN_CELLS) * u_area  # random.uniform(4, remaining)
            aspect = math.exp(lo + (hi - lo) * u_aspect)
            h = int(math.floor(math.sqrt(area * aspect) + 0.5))
            w = int(math.floor(math.sqrt(area / aspect) + 0.5))
            if w < g and h < g:
                top = min(int(u_top * (g - h + 1)), g - h)      # randint(0, g - h)
                left = min(int(u_left * (g - w + 1)), g - w)
                window = masked[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= remaining:
                    window[...] = True
                    delta += new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return (~masked).astype(np.uint8)


def _discrete_reference(g: int, ratio: float, rand: _Stream) -> np.ndarray:
    cells = g * g
    per_draw = -(-cells // 4)
    for _ in range(DISCRETE_MAX_DRAWS):
        u = np.array([rand.next4() for _ in range(per_draw)]).reshape(-1)[:cells]
        keep = (u >= ratio).astype(np.uint8)
        if 0 < keep.sum() < cells:
            return keep.reshape(g, g)
    c = min(int(rand.next4()[0] * cells), cells - 1)
    keep[c] = 1 - keep[c]
    return keep.reshape(g, g)
