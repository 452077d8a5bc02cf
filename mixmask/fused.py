"""uint8 NHWC views -> normalised views and the MixMask view, in one pass (docs/methods.md §1-2).

    x1 = (v1 - mean) / std,   x2 = (v2 - mean) / std,
    x~_j = (select(M_j, v1_j, v1_perm[j]) - mean) / std

Binary-mask mixing commutes with the per-channel normalisation, so mixing the uint8 pixels first is
exact. The normalised value of a pixel is DEFINED as round_dtype((float32(v) - m) / s) in float32
arithmetic, with m = float32(255 mean_c), s = float32(255 std_c), on every route:

- ``numba``: our fused kernels (kernels/mix.py on the CPU, kernels/mix_cuda.py on a GPU, launched on
  torch's current stream), one pass from uint8 to the outputs, no intermediate float tensor;
- ``torch``: the reference and fallback (a per-channel lookup table and a select);
- ``auto`` (default): numba when importable for the tensors' device, else torch.
All routes give identical bits (tests/mixmask/test_fused.py).
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch

from mixmask import masks as mk

Stats = tuple[float, float, float]
Route = Literal["auto", "numba", "torch"]


@functools.cache
def kernels_for(device_type: str):
    """The kernels module usable for tensors on ``device_type``, or None (then torch is used)."""
    try:
        import kernels
    except ImportError:  # numba missing: the torch route
        return None
    if device_type == "cpu":
        return kernels
    if device_type == "cuda":
        try:
            from numba import cuda

            return kernels if cuda.is_available() else None
        except ImportError:
            return None
    return None


def pixel_stats(mean: Stats, std: Stats) -> tuple[np.ndarray, np.ndarray]:
    """mean and std in uint8 pixel units as float32 (3,) arrays, rounded once from float64."""
    return (np.asarray(mean, np.float64) * 255).astype(np.float32), (np.asarray(std, np.float64) * 255).astype(np.float32)


def normalize_lut(mean: Stats, std: Stats, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Normalised value of every uint8 level per channel, as defined above.  -> (3, 256) in ``dtype``"""
    m, s = (torch.from_numpy(a)[:, None] for a in pixel_stats(mean, std))  # (3, 1) float32
    v = torch.arange(256, dtype=torch.float32)[None]  # (1, 256)
    return ((v - m) / s).to(dtype).to(device)


def _torch_normalize(v: torch.Tensor, lut: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    x = lut[torch.arange(3, device=v.device), v.long()]  # (N, H, W, 3): x[..., c] = lut[c, v[..., c]]
    return x.permute(0, 3, 1, 2).contiguous(memory_format=fmt)  # (N, 3, H, W)


def normalize_and_mix(
    v1: torch.Tensor,  # (N, H, W, 3) uint8
    v2: torch.Tensor | None,  # (N, H, W, 3) uint8, None = only x1
    masks: torch.Tensor | None,  # (1 or N, g, g) uint8, None = masking off
    perm: torch.Tensor | None,  # (N,) int64
    mean: Stats,  # 0-1 units
    std: Stats,  # 0-1 units
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    route: Route = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return (x1, x2, mixed), each (N, 3, H, W) in ``dtype`` (x2/mixed None when not asked for)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    k = None if route == "torch" else kernels_for(v1.device.type)
    if route == "numba" and k is None:
        raise RuntimeError(f"route='numba' asked for, but no Numba kernels for device {v1.device}")
    if k is None:
        lut = normalize_lut(mean, std, dtype, v1.device)
        mixed = None
        if masks is not None:
            u_mix = mk.mix(v1.permute(0, 3, 1, 2), masks, perm).permute(0, 2, 3, 1)  # (N, H, W, 3) uint8
            mixed = _torch_normalize(u_mix, lut, fmt)
        x2 = None if v2 is None else _torch_normalize(v2, lut, fmt)
        return _torch_normalize(v1, lut, fmt), x2, mixed

    n, h, w, _ = v1.shape
    want_x2 = v2 is not None
    v1 = v1.contiguous()
    v2 = v2.contiguous() if want_x2 else v1  # the kernel always writes two outputs
    outs = [torch.empty((n, 3, h, w), dtype=dtype, device=v1.device, memory_format=fmt) for _ in range(3 if masks is not None else 2)]

    def bits(t: torch.Tensor) -> torch.Tensor:  # what the kernel writes: (N, H, W, 3) or (N, 3, H, W)
        t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return t.permute(0, 2, 3, 1) if channels_last else t

    mean_px, std_px = pixel_stats(mean, std)
    layout = "channels_last" if channels_last else "nchw"
    m = None if masks is None else masks.to(v1.device, torch.uint8).contiguous()
    p = None if perm is None else perm.to(v1.device, torch.int64).contiguous()
    bufs = [bits(o) for o in outs] + ([None] if masks is None else [])
    if v1.device.type == "cpu":
        arr = lambda t: None if t is None else t.numpy()  # noqa: E731 - zero-copy views
        k.fused_mix(arr(v1), arr(v2), arr(m), arr(p), mean_px, std_px, *[arr(b) for b in bufs], layout=layout)
    else:
        from numba import cuda

        stream = cuda.external_stream(torch.cuda.current_stream(v1.device).cuda_stream)
        k.fused_mix_cuda(v1, v2, m, p, mean_px, std_px, *bufs, layout=layout, stream=stream)
    return outs[0], (outs[1] if want_x2 else None), (outs[2] if masks is not None else None)


def normalize(v: torch.Tensor, mean: Stats, std: Stats, dtype: torch.dtype = torch.float32,
              channels_last: bool = True, route: Route = "auto") -> torch.Tensor:
    """One uint8 view (N, H, W, 3) -> normalised (N, 3, H, W), no mixing (same routes and checks)."""
    return normalize_and_mix(v, None, None, None, mean, std, dtype, channels_last, route)[0]
