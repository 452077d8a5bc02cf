"""BYOL with MixMask (Grill et al. 2020, arXiv 2006.07733). docs/methods.md §4.3.

    p1, p2 = q(g(f(x1))), q(g(f(x2)))                  # online: backbone f, projector g, predictor q
    z1, z2 = g'(f'(x1)), g'(f'(x2))                    # target network, no gradient
    l(p, z) = 2 - 2 cos(p, z)
    L_j = l(p1_j, z2_j) + l(p2_j, z1_j)                # symmetric
        + lam_j l(p~_j, z2_j) + (1 - lam_j) l(p~_j, z2_perm[j])   # p~ = q(g(f(x~))): the mixed view
                                                        # regresses onto both sources' targets
    after each optimizer step k of K:  theta' <- tau theta' + (1 - tau) theta,
        tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixmask.batch import Batch
from mixmask.frameworks.base import Framework, cosine_momentum, credit_mixes, ema_, encode_views, frozen_copy
from mixmask.losses import normalized_mse
from mixmask.models import Arch, Backbone, BackboneSpec, Encoder, Stem, make_backbone, mlp


@dataclass
class BYOLConfig:
    dim: int = 256  # projection size
    mlp_hidden: int = 4096  # projector and predictor hidden width
    momentum: float = 0.996  # tau_base: the target EMA starts here and rises to 1 on a cosine

    def problems(self) -> list[str]:
        return [m for ok, m in [(self.dim >= 1, "dim must be >= 1"), (self.mlp_hidden >= 1, "mlp_hidden must be >= 1"),
                                (0 <= self.momentum < 1, "momentum must be in [0, 1)")] if not ok]


class BYOL(Framework):
    Config = BYOLConfig

    def __init__(self, cfg: BYOLConfig = BYOLConfig(), *, arch: Arch | BackboneSpec = "resnet50", stem: Stem = "imagenet",
                 seed: int = 0, group=None):
        super().__init__()
        self.cfg = cfg
        backbone = make_backbone(arch, stem)
        self.online = Encoder(backbone, mlp([backbone.width, cfg.mlp_hidden, cfg.dim]))
        self.predictor = mlp([cfg.dim, cfg.mlp_hidden, cfg.dim])
        self.target = frozen_copy(self.online)

    @property
    def backbone(self) -> Backbone:
        return self.online.backbone

    def target_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.target.backbone.feature_map(x)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        views = [batch.x1, batch.x2, *(m.x for m in batch.mixes)]
        p1, p2, *p_mix = encode_views(lambda x: self.predictor(self.online(x)), views, (self.online, self.predictor),
                                      self.batch_views)  # (N, D) each
        with torch.no_grad():
            z1, z2 = encode_views(self.target, views[:2], self.target, self.batch_views)  # (N, D)
        loss = normalized_mse(p1, z2) + normalized_mse(p2, z1)  # (N,)
        out = {"loss_clean": loss.mean()}
        mixed = credit_mixes(batch, p_mix, normalized_mse, z2)  # (N,)
        if mixed is not None:
            out["loss_mix"] = mixed.mean()
            loss = loss + mixed
        out["loss"] = loss.mean()
        return out

    def tau(self, step: int, total_steps: int) -> float:
        return cosine_momentum(self.cfg.momentum, step, total_steps)

    def after_step(self, step: int, total_steps: int) -> None:
        ema_(list(self.target.parameters()), list(self.online.parameters()), self.tau(step, total_steps))
