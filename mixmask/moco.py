"""MoCo v2 with MixMask (He et al. 2020, Chen et al. 2020; Vishniakov et al. arXiv 2210.11456).

Per step, for a batch of the two views x1, x2 and (optionally) the mixed view x~ of x1:

    q  = normalize(f_q(x1))                 # (N, D)
    q~ = normalize(f_q(x~))                 # (N, D), its own forward: BN statistics of mixed images apart
    theta_k <- m theta_k + (1 - m) theta_q  # momentum update, before the keys
    k  = normalize(f_k(x2))                 # (N, D), no gradient, shuffle-BN across processes
    L  = MixMask loss (mixmask/losses.py), queue <- enqueue(all_gather(k))  (clean keys only)

The process group is an argument (None = single process); there is no global rank lookup here.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mixmask.losses import mixmask_loss
from mixmask.models import Arch, Encoder


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


@torch.no_grad()
def all_gather_cat(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``t`` from every process of ``group`` along dim 0 (no gradient).  (N, ...) -> (W N, ...)"""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


class MoCoV2(nn.Module):
    def __init__(
        self,
        arch: Arch = "resnet50",
        stem: str = "imagenet",
        dim: int = 128,
        mlp_hidden: int = 0,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        seed: int = 0,
        group=None,
    ):
        super().__init__()
        self.m, self.t, self.shuffle_bn, self.group = momentum, temperature, shuffle_bn, group
        self.bn_splits, self.seed = bn_splits, seed
        self.encoder_q = Encoder(arch, stem, dim, mlp_hidden)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # (D, K)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("shuffles", torch.zeros((), dtype=torch.long))  # key shuffles drawn so far

    def _shuffle(self, n: int, device: torch.device) -> torch.Tensor:
        """The next shuffle-BN permutation, a function of (seed, count) only: exact on resume and the
        same on every process (no dependence on the global RNG, which data loading also consumes)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.shuffles))
        self.shuffles += 1
        return torch.randperm(n, generator=gen).to(device)

    @property
    def width(self) -> int:
        return self.encoder_q.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of the query encoder (kNN, linear probe).  (N, 3, H, W) -> (N, C)"""
        return self.encoder_q.features(x)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(self.m).add_(pq.detach(), alpha=1.0 - self.m)

    @torch.no_grad()
    def _keys(self, x2: torch.Tensor) -> torch.Tensor:
        """k = normalize(f_k(x2)), with the batch shuffled across processes (shuffle-BN).  -> (N, D)"""
        world = _world(self.group)
        if not self.shuffle_bn:
            return F.normalize(self.encoder_k(x2).float(), dim=1)
        if world == 1:  # emulated processes: BN statistics per chunk of a random shuffle
            if self.bn_splits == 1:
                return F.normalize(self.encoder_k(x2).float(), dim=1)  # one BN batch: order is irrelevant
            shuffle = self._shuffle(x2.shape[0], x2.device)
            k = self._split(self.encoder_k, x2[shuffle])
            return F.normalize(k.float(), dim=1)[torch.argsort(shuffle)]
        n, rank = x2.shape[0], dist.get_rank(self.group)
        x_all = all_gather_cat(x2, self.group)  # (W N, 3, H, W)
        shuffle = self._shuffle(x_all.shape[0], x2.device)  # identical on every process
        unshuffle = torch.argsort(shuffle)
        mine = shuffle[rank * n : (rank + 1) * n]
        k = F.normalize(self.encoder_k(x_all[mine]).float(), dim=1)  # (N, D), shuffled
        k_all = all_gather_cat(k, self.group)  # (W N, D)
        return k_all[unshuffle[rank * n : (rank + 1) * n]]

    def _split(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """encoder(x) with BN statistics per chunk: bn_splits emulated processes (one process only)."""
        if self.bn_splits == 1 or _world(self.group) > 1:
            return encoder(x)
        return torch.cat([encoder(c) for c in x.chunk(self.bn_splits)])

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        keys = all_gather_cat(k, self.group)  # (W N, D)
        size = self.queue.shape[1]
        keys = keys[-size:]
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)

    def forward(
        self,
        x1: torch.Tensor,  # (N, 3, H, W)
        x2: torch.Tensor,  # (N, 3, H, W)
        mixed: torch.Tensor | None = None,  # (N, 3, H, W) or None = plain MoCo v2
        perm: torch.Tensor | None = None,  # (N,)
        lam: torch.Tensor | None = None,  # (N,)
    ) -> dict[str, torch.Tensor]:
        q = F.normalize(self._split(self.encoder_q, x1).float(), dim=1)  # (N, D)
        q_mix = None if mixed is None else F.normalize(self._split(self.encoder_q, mixed).float(), dim=1)
        self._momentum_update()
        k = self._keys(x2)  # (N, D)
        out = mixmask_loss(q, k, self.queue.clone().detach(), self.t, q_mix, perm, lam)
        self._enqueue(k)
        return out
