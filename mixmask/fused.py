"""uint8 NHWC views -> normalised views and the MixMask view (SPEC.md 7).

    x1 = (v1 - mean) / std,   x2 = (v2 - mean) / std,
    x~_j = (select(M_j, v1_j, v1_perm[j]) - mean) / std

Binary-mask mixing commutes with the per-channel normalisation, so mixing the uint8 pixels first is
exact. Everything runs on the device the views are on; the torch route below is the reference.
"""

from __future__ import annotations

import torch

from mixmask import masks as mk

Stats = tuple[float, float, float]


def normalize_lut(mean: Stats, std: Stats, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Normalised value of every uint8 level per channel.  -> (3, 256) in ``dtype``

    Defined as round_dtype(round_float32((v - 255 mean_c) / (255 std_c))), the formula evaluated in
    float64: every route (torch, Numba CPU, CUDA) produces exactly these values.
    """
    v = torch.arange(256, dtype=torch.float64)
    m = torch.tensor(mean, dtype=torch.float64)[:, None] * 255.0
    s = torch.tensor(std, dtype=torch.float64)[:, None] * 255.0
    return ((v - m) / s).float().to(dtype).to(device)


def normalize(
    v: torch.Tensor,  # (N, H, W, 3) uint8
    mean: Stats,  # 0-1 units
    std: Stats,  # 0-1 units
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> torch.Tensor:
    """(v - 255 mean) / (255 std) as (N, 3, H, W) in ``dtype`` and the requested memory format."""
    lut = normalize_lut(mean, std, dtype, v.device)  # (3, 256)
    x = lut[torch.arange(3, device=v.device), v.long()]  # (N, H, W, 3): x[..., c] = lut[c, v[..., c]]
    x = x.permute(0, 3, 1, 2)  # (N, 3, H, W), NHWC memory
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def normalize_and_mix(
    v1: torch.Tensor,  # (N, H, W, 3) uint8
    v2: torch.Tensor,  # (N, H, W, 3) uint8
    masks: torch.Tensor | None,  # (1 or N, g, g) uint8, None = masking off
    perm: torch.Tensor | None,  # (N,) int64
    mean: Stats,
    std: Stats,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (x1, x2, mixed), each (N, 3, H, W) in ``dtype``; mixed is None without masks."""
    mixed = None
    if masks is not None:
        u1 = v1.permute(0, 3, 1, 2)  # (N, 3, H, W) uint8 view of the NHWC memory
        u_mix = mk.mix(u1, masks, perm).permute(0, 2, 3, 1)  # (N, H, W, 3) uint8
        mixed = normalize(u_mix, mean, std, dtype, channels_last)
    return normalize(v1, mean, std, dtype, channels_last), normalize(v2, mean, std, dtype, channels_last), mixed
