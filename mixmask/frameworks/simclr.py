"""SimCLR with MixMask (Chen et al. 2020, arXiv 2002.05709). docs/methods.md §4.2.

    z1 = g(f(x1)), z2 = g(f(x2))                         # (N, D) projections of the clean views
    Z1, Z2 = all_gather_with_grad(z1), (z2)              # (W N, D): negatives from every process
    L_clean_j = NT-Xent over the 2 W N views (mixmask/losses/nt_xent.py)
    z~ = g(f(x~));  s_ja = cos(z~_j, Z2_a) / T           # (N, W N) the mixed anchor against the second views
    L_mix_j = lam_j CE(s_j, j) + (1 - lam_j) CE(s_j, perm[j])   # positives: both sources' second views
    L = (1/N) sum_j (L_clean_j + L_mix_j)

The gather's backward sums gradients over ranks, so with DDP the gradient equals one process's on the
concatenated batch (tests/mixmask/test_distributed_losses.py). Projector: Linear-BN-ReLU-Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixmask import distributed as D
from mixmask.batch import Batch
from mixmask.frameworks.base import Framework, credit_mixes, encode_views
from mixmask.losses import float32, nt_xent
from mixmask.models import Arch, Backbone, BackboneSpec, Encoder, Stem, make_backbone, mlp


@dataclass
class SimCLRConfig:
    dim: int = 128  # projection size
    mlp_hidden: int = 0  # projector hidden width; 0 = the backbone's width (2048 for ResNet-50)
    temperature: float = 0.1  # T (the paper's best with LARS at batch 4096; 0.2-0.5 for small batches)

    def problems(self) -> list[str]:
        return [m for ok, m in [(self.dim >= 1, "dim must be >= 1"), (self.mlp_hidden >= 0, "mlp_hidden must be >= 0"),
                                (self.temperature > 0, "temperature must be > 0")] if not ok]


@float32
def cross_view_logits(z: torch.Tensor, bank: torch.Tensor, t: float) -> torch.Tensor:
    """cos(z_j, bank_a) / T.  (N, D), (M, D) -> (N, M) float32"""
    return F.normalize(z, dim=1) @ F.normalize(bank, dim=1).T / t


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (N, M), (N,) -> (N,)
    return F.cross_entropy(logits, target, reduction="none")


class SimCLR(Framework):
    Config = SimCLRConfig

    def __init__(self, cfg: SimCLRConfig = SimCLRConfig(), *, arch: Arch | BackboneSpec = "resnet50", stem: Stem = "imagenet",
                 seed: int = 0, group=None):
        super().__init__()
        self.cfg, self.group = cfg, group
        backbone = make_backbone(arch, stem)
        self.encoder = Encoder(backbone, mlp([backbone.width, cfg.mlp_hidden or backbone.width, cfg.dim]))

    @property
    def backbone(self) -> Backbone:
        return self.encoder.backbone

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        t, n = self.cfg.temperature, batch.size
        views = [batch.x1, batch.x2, *(m.x for m in batch.mixes)]
        z1, z2, *z_mix = encode_views(self.encoder, views, self.encoder, self.batch_views)  # (N, D) each
        z1_all, z2_all = D.gather_with_grad(z1, self.group), D.gather_with_grad(z2, self.group)  # (W N, D)
        offset = D.rank(self.group) * n
        loss = nt_xent(z1, z2, z1_all, z2_all, offset, t)  # (N,)
        out = {"loss_clean": loss.mean()}
        own = offset + torch.arange(n, device=z2.device)  # (N,) column of each sample's second view
        mixed = credit_mixes(batch, [cross_view_logits(z, z2_all, t) for z in z_mix], cross_entropy, own)  # (N,)
        if mixed is not None:
            out["loss_mix"] = mixed.mean()
            loss = loss + mixed
        out["loss"] = loss.mean()
        return out
