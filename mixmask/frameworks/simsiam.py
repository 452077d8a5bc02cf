"""SimSiam with MixMask (Chen & He 2021, arXiv 2011.10566). docs/methods.md §4.4.

    z1, z2 = g(f(x1)), g(f(x2));  p1, p2 = h(z1), h(z2)      # projector g (3 layers), predictor h
    D(p, z) = -cos(p, stopgrad(z))
    L_j = (D(p1_j, z2_j) + D(p2_j, z1_j)) / 2
        + lam_j D(p~_j, z2_j) + (1 - lam_j) D(p~_j, z2_perm[j])    # p~ = h(g(f(x~)))
The predictor is trained at a FIXED learning rate (the paper's "fix_pred_lr"): its optimizer group
carries fixed_lr, and the engine never decays it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixmask.batch import Batch
from mixmask.frameworks.base import Framework, credit_mixes, encode_views, split_bias_bn
from mixmask.losses import negative_cosine
from mixmask.models import Arch, Backbone, BackboneSpec, Encoder, Stem, make_backbone, mlp


@dataclass
class SimSiamConfig:
    dim: int = 2048  # projection size
    mlp_hidden: int = 2048  # projector hidden width
    pred_hidden: int = 512  # predictor bottleneck
    fix_pred_lr: bool = True  # predictor at the base lr, not decayed (the paper's setting)

    def problems(self) -> list[str]:
        return [f"{k} must be >= 1" for k in ("dim", "mlp_hidden", "pred_hidden") if getattr(self, k) < 1]


class SimSiam(Framework):
    Config = SimSiamConfig

    def __init__(self, cfg: SimSiamConfig = SimSiamConfig(), *, arch: Arch | BackboneSpec = "resnet50", stem: Stem = "imagenet",
                 seed: int = 0, group=None):
        super().__init__()
        self.cfg = cfg
        backbone = make_backbone(arch, stem)
        self.encoder = Encoder(backbone, mlp([backbone.width, cfg.mlp_hidden, cfg.mlp_hidden, cfg.dim], last_bn=True,
                                             last_bias=False))  # BN follows: a bias would get no gradient
        self.predictor = mlp([cfg.dim, cfg.pred_hidden, cfg.dim])

    @property
    def backbone(self) -> Backbone:
        return self.encoder.backbone

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        views = [batch.x1, batch.x2, *(m.x for m in batch.mixes)]
        zs = encode_views(self.encoder, views, self.encoder, self.batch_views)  # (N, D) each
        z1, z2 = zs[:2]
        p1, p2, *p_mix = encode_views(self.predictor, zs, self.predictor, self.batch_views)  # (N, D) each
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))  # (N,)
        out = {"loss_clean": loss.mean()}
        mixed = credit_mixes(batch, p_mix, negative_cosine, z2)  # (N,)
        if mixed is not None:
            out["loss_mix"] = mixed.mean()
            loss = loss + mixed
        out["loss"] = loss.mean()
        return out

    def param_groups(self, weight_decay: float, exclude_bias_bn: bool = False) -> list[dict]:
        groups = split_bias_bn(self.encoder.named_parameters(), weight_decay, exclude_bias_bn)
        return groups + [{**g, "name": "predictor_" + g["name"]} for g in split_bias_bn(
            self.predictor.named_parameters(), weight_decay, exclude_bias_bn, fixed_lr=self.cfg.fix_pred_lr)]
