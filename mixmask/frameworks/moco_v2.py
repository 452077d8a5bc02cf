"""MoCo v2 with MixMask (He et al. 2020, arXiv 1911.05722; Chen et al. 2020, arXiv 2003.04297;
Vishniakov et al., arXiv 2210.11456). docs/methods.md §4.1.

Per step, for the two views x1, x2 and (optionally) the mixed view x~ of x1, queue {n_i} of K keys:

    q  = normalize(f_q(x1))                  # (N, D)
    q~ = normalize(f_q(x~))                  # (N, D), BN statistics of mixed images apart (own forward, or
                                             # one batched forward with BN per view: model.batch_views)
    k  = normalize(f_k(x2))                  # (N, D), no gradient, shuffle-BN
    L  = (1/N) sum_j [ l(q_j, k_j) + lam_j l(q~_j, k_j) + (1 - lam_j) l(q~_j, k_perm[j]) ]   (summed over
         every mixed view of the batch; with a hard negative h_j = normalize(f_k(batch.hard_negative_j)) the
         first term is l(q_j, k_j; h_j), the hard negative weighted by hard_alpha, docs/methods.md §7)
    queue <- enqueue(all_gather(k))          # clean keys only
    theta_k <- m theta_k + (1 - m) theta_q   # after_step: once per optimizer step, after it

with l the InfoNCE of mixmask/losses/info_nce.py. Doing the momentum update after the optimizer step
is the same as MoCo's "before the keys of the next step" (at step 0 both encoders are equal), and it
runs once per step however many micro-batches the step accumulates.

Shuffle-BN: with several processes the keys are encoded in a batch shuffled across processes. On ONE
process the same protection is split BN: queries in ``bn_splits`` contiguous chunks and keys in
``bn_splits`` chunks of a random shuffle, BN statistics per chunk, so a query and its positive key never
share batch statistics (the leak shuffle-BN blocks). The default was chosen by measurement (README).
With model.batch_views the queries of x1 and the mixed views are one forward whose BN groups are
views x bn_splits chunks (each view chunked as before), and the split keys one forward of bn_splits groups:
the same statistics, outputs and running-statistic updates as the separate calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixmask import distributed as D
from mixmask.batch import Batch
from mixmask.frameworks.base import Framework, credit_mixes, ema_, encode_views, frozen_copy
from mixmask.losses import info_nce, normalize
from mixmask.models import Arch, Backbone, BackboneSpec, Encoder, Stem, make_backbone, mlp


@dataclass
class MoCoV2Config:
    dim: int = 128  # output embedding size
    mlp_hidden: int = 0  # hidden width of the 2-layer MLP head; 0 = the backbone's width (2048 for ResNet-50)
    queue: int = 65536  # K: number of negative keys
    momentum: float = 0.999  # m: key-encoder EMA coefficient
    temperature: float = 0.2  # T in the InfoNCE logits
    shuffle_bn: bool = True  # keys in a batch shuffled across processes (split BN on one process)
    bn_splits: int = 2  # one process: BN statistics per chunk of this many (1 = off: the leak is open; README)
    hard_alpha: float = 2.0  # weight of the hard negative in the InfoNCE denominator (Chin et al.'s alpha)

    def problems(self) -> list[str]:
        return [m for ok, m in [(self.dim >= 1, "dim must be >= 1"), (self.mlp_hidden >= 0, "mlp_hidden must be >= 0"),
                                (self.queue >= 1, "queue must be >= 1"), (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
                                (self.temperature > 0, "temperature must be > 0"), (self.bn_splits >= 1, "bn_splits must be >= 1"),
                                (self.hard_alpha > 0, "hard_alpha must be > 0")] if not ok]


class MoCoV2(Framework):
    Config = MoCoV2Config
    hard_negatives = True

    def __init__(self, cfg: MoCoV2Config = MoCoV2Config(), *, arch: Arch | BackboneSpec = "resnet50", stem: Stem = "imagenet",
                 seed: int = 0, group=None):
        super().__init__()
        self.cfg, self.seed, self.group = cfg, seed, group
        backbone = make_backbone(arch, stem)
        self.encoder_q = Encoder(backbone, mlp([backbone.width, cfg.mlp_hidden or backbone.width, cfg.dim], bn=False))
        self.encoder_k = frozen_copy(self.encoder_q)
        self.register_buffer("queue", normalize(torch.randn(cfg.queue, cfg.dim)).T.contiguous())  # (D, K)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("shuffles", torch.zeros((), dtype=torch.long))  # key shuffles drawn so far

    @property
    def backbone(self) -> Backbone:
        return self.encoder_q.backbone

    def target_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_k.backbone.feature_map(x)

    def _shuffle(self, n: int, device: torch.device) -> torch.Tensor:
        """The next shuffle-BN permutation, a function of (seed, count) only: exact on resume and the
        same on every process (no dependence on the global RNG, which data loading also consumes)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.shuffles))
        self.shuffles += 1
        return torch.randperm(n, generator=gen).to(device)

    def _splits(self) -> int:
        """Chunks per view with their own BN statistics: bn_splits emulated processes (one process only)."""
        return 1 if not self.cfg.shuffle_bn or D.world_size(self.group) > 1 else self.cfg.bn_splits

    def _encode(self, encoder: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """encoder(x) for each view, BN statistics per view and per split-BN chunk of it: with
        model.batch_views one forward whose BN groups are views x bn_splits chunks (encode_views)."""
        return encode_views(encoder, xs, encoder, self.batch_views, self._splits())

    @torch.no_grad()
    def _keys(self, x2: torch.Tensor) -> torch.Tensor:
        """k = normalize(f_k(x2)), encoded in a shuffled batch (shuffle-BN / split BN).  -> (N, D)"""
        world = D.world_size(self.group)
        if not self.cfg.shuffle_bn or (world == 1 and self.cfg.bn_splits == 1):
            return normalize(self.encoder_k(x2))
        if world == 1:
            shuffle = self._shuffle(x2.shape[0], x2.device)
            return normalize(self._encode(self.encoder_k, [x2[shuffle]])[0])[torch.argsort(shuffle)]
        n, rank = x2.shape[0], D.rank(self.group)
        x_all = D.gather(x2, self.group)  # (W N, 3, H, W)
        shuffle = self._shuffle(x_all.shape[0], x2.device)  # identical on every process
        mine = shuffle[rank * n : (rank + 1) * n]
        k_all = D.gather(normalize(self.encoder_k(x_all[mine])), self.group)  # (W N, D), shuffled
        return k_all[torch.argsort(shuffle)[rank * n : (rank + 1) * n]]

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        keys = D.gather(k, self.group)[-self.queue.shape[1] :]  # (W N, D)
        ptr, size = int(self.queue_ptr), self.queue.shape[1]
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        t = self.cfg.temperature
        # the queries of x1 and of every mixed view: (N, D) each; the mixed views' BN statistics apart
        q, *q_mix = [normalize(z) for z in self._encode(self.encoder_q, [batch.x1, *(m.x for m in batch.mixes)])]
        k = self._keys(batch.x2)  # (N, D)
        queue = self.queue.clone()  # (D, K): the enqueue below must not change what backward reads
        hard = None if batch.hard_negative is None else self._keys(batch.hard_negative)  # (N, D)
        loss = info_nce(q, k, queue, t, hard, self.cfg.hard_alpha)  # (N,)
        out = {"loss_clean": loss.mean()}
        mixed = credit_mixes(batch, q_mix, lambda z, key: info_nce(z, key, queue, t), k)  # (N,)
        if mixed is not None:
            out["loss_mix"] = mixed.mean()
            loss = loss + mixed
        self._enqueue(k)
        out["loss"] = loss.mean()
        return out

    def after_step(self, step: int, total_steps: int) -> None:
        ema_(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), self.cfg.momentum)
