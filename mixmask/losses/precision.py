"""Every loss runs in float32, even under autocast (docs/methods.md §3).

Autocast casts a matmul's inputs to bf16/fp16 whatever their dtype, so a ``.float()`` inside a loss does
not protect it: MoCo's logits against a 65536-key queue in bf16 move the per-sample InfoNCE by up to
~0.065. ``float32`` runs the loss with autocast off for the tensors' device and its floating inputs
cast to float32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def float32(fn):
    """Decorator: run ``fn`` with autocast disabled and floating tensor arguments in float32."""

    def cast(a):
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


@float32
def normalize(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows, in float32.  (N, D) -> (N, D)"""
    return F.normalize(z, dim=1)
