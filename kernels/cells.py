"""Cell masks of erase-based and saliency-guided masking, drawn on the host (numba njit) with a
plain-numpy reference on the same Philox stream. docs/methods.md §7.2-7.4.

    masks, boxes = cell_masks(fg, C, g, r_lo, r_hi, spatial_p, focal_p, focal_size, cap, mode, H, W,
                              seed, epoch, batch_index, stream)
    masks (N, C, g, g) uint8, 1 = keep, 0 = erase (kernels/fill.py noise_fill_) or take the partner;
    boxes (N, 4) int64 focal windows (top, left, h, w), h = 0: none.

Per sample j, from uniform4(seed, epoch, batch_index, j, stream * 2**24 + k) (kernels/rng.py):
  call 0: focal = u0 < focal_p; spatial = u1 < spatial_p; r = r_lo + (r_hi - r_lo) u2
  call 1 (focal only): window h = round(focal_size H), w = round(focal_size W),
          top = min(floor(u0 (H - h + 1)), H - h), left likewise from u1; no cell is erased
  calls 2...: one priority per (plane, cell): u[plane * G + i], G = g * g, four per call;
          one plane (spatial: every channel shares it) or C planes (channel-wise)
  In each plane the erased cells are those of lowest priority within their group:
  - mode "uniform" (MSCN, Jing et al. arXiv 2206.07700): int(r G) cells of the whole grid;
  - mode "balanced" (Chin et al. arXiv 2309.12757): with nf foreground cells (fg[j] = 1) and
      n = int(r G):  n_fg = min(round(n nf / G), round(cap G), nf),  n_bg = min(n - n_fg, G - nf),
    so the masked fraction is the same in foreground and background (each count within half a cell
    of n x its share; the paper writes round(min(r nf / G, cap) G), which can be off by 1.5 cells);
  - mode "foreground" (the hard negative): round(r nf) foreground cells, no background cell.
Each cell's priority is its own draw, so the cells masked are a uniform random subset of the group
and differ per sample (the reference code took every hard negative's cells from sample 0).

foreground_cells(A, t): fg = A >= mean(A) - t std(A) per sample, on the cell map A (N, G) itself
(the reference code thresholded a row-sorted copy, so foreground landed in the wrong columns).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.rng import STREAM_SHIFT, uniform4, uniform4_reference

MODES = {"uniform": 0, "balanced": 1, "foreground": 2}


def foreground_cells(A: np.ndarray, t: float = 0.6) -> np.ndarray:
    """(N, G) saliency per cell -> (N, G) uint8, 1 = foreground: A >= mean - t std (per sample)."""
    A = np.asarray(A, np.float64)
    if A.ndim != 2:
        raise ValueError(f"A must be (N, G), got {A.shape}")
    return (A >= A.mean(1, keepdims=True) - t * A.std(1, keepdims=True)).astype(np.uint8)


def _counts(mode, r, nf, G, cap):
    """(n_fg, n_bg): cells to erase in the foreground and the background of one plane."""
    if mode == 0:
        return 0, int(r * G)
    if mode == 2:
        return min(int(np.floor(r * nf + 0.5)), nf), 0
    n = int(r * G)
    n_fg = min(int(np.floor(n * nf / G + 0.5)), int(np.floor(cap * G + 0.5)), nf)
    return n_fg, min(n - n_fg, G - nf)


_counts_jit = njit(inline="always")(_counts)


@njit(nogil=True, cache=True)
def _cell_masks(fg, masks, boxes, r_lo, r_hi, spatial_p, focal_p, focal_size, cap, mode, H, W, seed, epoch,
                batch_index, stream):
    N, C, g = masks.shape[0], masks.shape[1], masks.shape[2]
    G = g * g
    base = stream << STREAM_SHIFT
    prio = np.empty(G, np.float64)
    for j in range(N):
        masks[j] = 1
        boxes[j] = 0
        u0, u1, u2, _ = uniform4(seed, epoch, batch_index, j, base)
        r = r_lo + (r_hi - r_lo) * u2
        if u0 < focal_p:
            h = int(np.floor(focal_size * H + 0.5))
            w = int(np.floor(focal_size * W + 0.5))
            v0, v1, _, _ = uniform4(seed, epoch, batch_index, j, base + 1)
            boxes[j, 0] = min(int(v0 * (H - h + 1)), H - h)
            boxes[j, 1] = min(int(v1 * (W - w + 1)), W - w)
            boxes[j, 2] = h
            boxes[j, 3] = w
            continue
        planes = 1 if u1 < spatial_p else C
        nf = 0
        for i in range(G):
            nf += fg[j, i] != 0
        n_fg, n_bg = _counts_jit(mode, r, nf, G, cap)
        for pl in range(planes):
            for i in range(G):
                q = pl * G + i
                prio[i] = uniform4(seed, epoch, batch_index, j, base + 2 + (q >> 2))[q & 3]
            order = np.argsort(prio, kind="mergesort")  # stable: ties by cell index
            took_fg = 0
            took_bg = 0
            for i in order:
                is_fg = mode != 0 and fg[j, i] != 0
                if is_fg and took_fg < n_fg:
                    took_fg += 1
                elif not is_fg and took_bg < n_bg:
                    took_bg += 1
                else:
                    continue
                for c in range(C if planes == 1 else 1):
                    masks[j, c if planes == 1 else pl, i // g, i % g] = 0


def _check(fg, N, C, g, r_lo, r_hi, spatial_p, focal_p, focal_size, cap, mode, H, W):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if N < 0 or C < 1 or g < 1 or H < 1 or W < 1:
        raise ValueError(f"need N >= 0 and C, g, H, W >= 1, got {N}, {C}, {g}, {H}, {W}")
    if not 0.0 <= r_lo <= r_hi <= 1.0:
        raise ValueError(f"need 0 <= r_lo <= r_hi <= 1, got {r_lo}, {r_hi}")
    for name, p in (("spatial_p", spatial_p), ("focal_p", focal_p), ("cap", cap)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if not 0.0 < focal_size <= 1.0 or (focal_p > 0 and np.floor(focal_size * min(H, W) + 0.5) < 1):
        raise ValueError(f"focal_size must be in (0, 1] and leave a window of >= 1 px, got {focal_size} at {H}x{W}")
    if fg is not None and tuple(fg.shape) != (N, g * g):
        raise ValueError(f"fg must be (N={N}, g*g={g * g}), got {fg.shape}")
    if mode != "uniform" and fg is None:
        raise ValueError(f"mode {mode!r} needs the foreground cells fg")


def cell_masks(fg, N: int, C: int, g: int, r_lo: float, r_hi: float, spatial_p: float, focal_p: float,
               focal_size: float, cap: float, mode: str, H: int, W: int, seed: int, epoch: int,
               batch_index: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw the N samples' masks (N, C, g, g) uint8 and focal windows (N, 4) int64 (module docstring)."""
    _check(fg, N, C, g, r_lo, r_hi, spatial_p, focal_p, focal_size, cap, mode, H, W)
    masks = np.empty((N, C, g, g), np.uint8)
    boxes = np.empty((N, 4), np.int64)
    fg = np.zeros((N, g * g), np.uint8) if fg is None else np.ascontiguousarray(fg, np.uint8)
    _cell_masks(fg, masks, boxes, float(r_lo), float(r_hi), float(spatial_p), float(focal_p), float(focal_size),
                float(cap), MODES[mode], int(H), int(W), np.uint64(seed), np.int64(epoch), np.int64(batch_index),
                np.int64(stream))
    return masks, boxes


def cell_masks_reference(fg, N, C, g, r_lo, r_hi, spatial_p, focal_p, focal_size, cap, mode, H, W, seed, epoch,
                         batch_index, stream):
    """Reference twin of cell_masks (Python-int Philox, numpy selection)."""
    _check(fg, N, C, g, r_lo, r_hi, spatial_p, focal_p, focal_size, cap, mode, H, W)
    G, base = g * g, stream << STREAM_SHIFT
    masks = np.ones((N, C, g, g), np.uint8)
    boxes = np.zeros((N, 4), np.int64)
    for j in range(N):
        u = lambda k: uniform4_reference(seed, epoch, batch_index, j, base + k)  # noqa: E731
        u0, u1, u2, _ = u(0)
        r = r_lo + (r_hi - r_lo) * u2
        if u0 < focal_p:
            h, w = int(np.floor(focal_size * H + 0.5)), int(np.floor(focal_size * W + 0.5))
            v = u(1)
            boxes[j] = (min(int(v[0] * (H - h + 1)), H - h), min(int(v[1] * (W - w + 1)), W - w), h, w)
            continue
        planes = 1 if u1 < spatial_p else C
        is_fg = np.zeros(G, bool) if mode == "uniform" else np.asarray(fg[j]) != 0
        n_fg, n_bg = _counts(MODES[mode], r, int(is_fg.sum()), G, cap)
        for pl in range(planes):
            prio = np.array([u(2 + (pl * G + i) // 4)[(pl * G + i) % 4] for i in range(G)])
            erase = np.zeros(G, bool)
            for group, count in ((is_fg, n_fg), (~is_fg, n_bg)):
                cells = np.flatnonzero(group)
                erase[cells[np.argsort(prio[cells], kind="stable")[:count]]] = True
            target = masks[j] if planes == 1 else masks[j, pl:pl + 1]
            target[:, erase.reshape(g, g)] = 0
    return masks, boxes
