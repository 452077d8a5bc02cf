"""Collectives over an explicit process group (None = a single process): no global rank lookups.

``gather`` concatenates without gradient (MoCo's keys and queue); ``gather_with_grad`` uses
torch.distributed.nn, whose backward sums the gradients of every rank's copy and returns each rank its
own slice, so under DDP's gradient averaging a loss over the gathered batch trains exactly like one
process holding the concatenated batch (tests/mixmask/test_distributed_losses.py checks loss and gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@torch.no_grad()
def gather(t: torch.Tensor, group) -> torch.Tensor:
    """(N, ...) on every rank -> (W N, ...) in rank order, no gradient."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def gather_with_grad(t: torch.Tensor, group) -> torch.Tensor:
    """(N, ...) on every rank -> (W N, ...) in rank order; gradients flow back to every rank's slice."""
    if group is None:
        return t
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(t.contiguous(), group=group))
