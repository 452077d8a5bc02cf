"""Barlow Twins with MixMask (Zbontar et al. 2021, arXiv 2103.03230). docs/methods.md §4.5.

    z1, z2 = g(f(x1)), g(f(x2))                    # (N, D); gathered with gradient: the GLOBAL batch
    L_BT(a, b) = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2,  C = std(a)^T std(b) / N
The loss is batch-level, not a sum over pairs, so its MixMask form is defined here (ours): the target of
the mixed view is the lam-weighted mix of its two sources' second-view embeddings,

    t~_j = lam_j z2_j + (1 - lam_j) z2_perm[j]      # (N, D), re-standardised inside L_BT
    L = L_BT(z1, z2) + L_BT(z~, t~)                 # z~ = g(f(x~))

lam = 1 gives L_BT(z~, z2) (the own targets), lam = 0 gives L_BT(z~, z2[perm]) (the partner's). The
standardisation inside L_BT rescales the mixed target to unit variance per dimension, so C_ii can still
reach 1 (a mix of two independent targets has variance lam^2 + (1 - lam)^2 < 1). Gradient flows through
both branches, as in Barlow Twins. Biases and BN parameters may get their own lr (bias_lr_scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixmask import distributed as D
from mixmask.batch import Batch
from mixmask.frameworks.base import Framework, encode_views, split_bias_bn
from mixmask.losses import barlow_twins
from mixmask.models import Arch, Backbone, BackboneSpec, Encoder, Stem, make_backbone, mlp


@dataclass
class BarlowTwinsConfig:
    dim: int = 8192  # projector output size
    mlp_hidden: int = 8192  # projector hidden width (3 Linear layers)
    lambd: float = 0.0051  # weight of the off-diagonal terms (the official code's value; 5e-3 in the paper)
    bias_lr_scale: float = 0.024  # lr of biases/BN = this x the weights' lr (0.0048 / 0.2 in the paper)

    def problems(self) -> list[str]:
        return [m for ok, m in [(self.dim >= 1, "dim must be >= 1"), (self.mlp_hidden >= 1, "mlp_hidden must be >= 1"),
                                (self.lambd >= 0, "lambd must be >= 0"), (self.bias_lr_scale > 0, "bias_lr_scale must be > 0")] if not ok]


class BarlowTwins(Framework):
    Config = BarlowTwinsConfig

    def __init__(self, cfg: BarlowTwinsConfig = BarlowTwinsConfig(), *, arch: Arch | BackboneSpec = "resnet50",
                 stem: Stem = "imagenet", seed: int = 0, group=None):
        super().__init__()
        self.cfg, self.group = cfg, group
        backbone = make_backbone(arch, stem)
        self.encoder = Encoder(backbone, mlp([backbone.width, cfg.mlp_hidden, cfg.mlp_hidden, cfg.dim], last_bias=False))

    @property
    def backbone(self) -> Backbone:
        return self.encoder.backbone

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        views = [batch.x1, batch.x2, *(m.x for m in batch.mixes)]
        z1, z2, *z_mix = encode_views(self.encoder, views, self.encoder, self.batch_views)  # (N, D) each
        gather = lambda z: D.gather_with_grad(z, self.group)  # noqa: E731 - (N, D) -> (W N, D)
        loss = barlow_twins(gather(z1), gather(z2), self.cfg.lambd)
        out = {"loss_clean": loss}
        z2 = z2.float()
        for m, z in zip(batch.mixes, z_mix):  # each mixed view against the lam-weighted mix of its sources' targets
            lam = m.lam.to(z2.device, torch.float32)[:, None]  # (N, 1)
            target = z2 if m.perm is None else lam * z2 + (1.0 - lam) * z2[m.perm]  # (N, D)
            part = barlow_twins(gather(z), gather(target), self.cfg.lambd)
            out["loss_mix"] = out.get("loss_mix", 0.0) + part
            loss = loss + part
        out["loss"] = loss
        return out

    def param_groups(self, weight_decay: float, exclude_bias_bn: bool = False) -> list[dict]:
        groups = split_bias_bn(self.named_parameters(), weight_decay, exclude_bias_bn)
        for g in groups:
            if g["name"] == "biases_norms":
                g["lr_scale"] = self.cfg.bias_lr_scale
        return groups
