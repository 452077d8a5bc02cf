"""The interface every self-supervised framework implements (docs/methods.md §4).

The engine, the evaluations and train.py call only these:

    forward(batch) -> {"loss": scalar, <part>: scalar, ...}   parts are logged as they are
    features(x)    -> (N, C)   pooled online-backbone features (kNN, linear probe)
    feature_map(x) -> (N, C, h, w)   the online backbone's last map (saliency, ContrastiveCrop)
    target_feature_map(x)            the momentum/target backbone's last map (the online one if none)
    param_groups(weight_decay, exclude_bias_bn) -> optimizer groups; a group may carry
                      "lr_scale" (its lr = scale x the scheduled lr) or "fixed_lr" (never decayed)
    after_step(step, total_steps)   once per optimizer step, after it: momentum/EMA updates

A framework gets its process group as an argument (None = one process); it never looks up a global rank.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mixmask.batch import Batch
from mixmask.losses import area_credited
from mixmask.models import Backbone


class Framework(nn.Module):
    backbone: Backbone  # the online backbone: what evaluation and export read
    hard_negatives: bool = False  # forward uses batch.hard_negative (frameworks with negatives)
    masks_tokens: bool = False  # forward needs batch.keep (token masking in the input pipeline)
    vit_only: bool = False  # needs a ViT backbone

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def width(self) -> int:
        return self.backbone.width

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C)
        return self.backbone(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C, h, w)
        return self.backbone.feature_map(x)

    def target_feature_map(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C, h, w)
        """The momentum/target network's last map where there is one (saliency from the model's own view);
        frameworks without one use the online backbone."""
        return self.feature_map(x)

    def param_groups(self, weight_decay: float, exclude_bias_bn: bool = False) -> list[dict]:
        """Trainable parameters; exclude_bias_bn puts biases and norm weights (ndim <= 1) in a group
        without weight decay (which, with LARS, also skips the trust-ratio adaptation)."""
        return split_bias_bn(self.named_parameters(), weight_decay, exclude_bias_bn)

    def after_step(self, step: int, total_steps: int) -> None:
        """Called once per optimizer step; frameworks without a momentum network do nothing."""


def credit_mixes(batch: Batch, embed, pair_loss, target: torch.Tensor) -> torch.Tensor | None:
    """Sum over the batch's mixed views of area_credited(pair_loss, embed(view), target, perm, lam).
    -> (N,) float32, or None without mixed views"""
    total = None
    for m in batch.mixes:
        part = area_credited(pair_loss, embed(m.x), target, m.perm, m.lam)
        total = part if total is None else total + part
    return total


def split_bias_bn(named, weight_decay: float, exclude_bias_bn: bool, no_decay: tuple[str, ...] = (),
                  **extra) -> list[dict]:
    """Groups {"params", "weight_decay", "lr_scale", "fixed_lr", "name"} of the trainable parameters;
    with exclude_bias_bn the 1-D ones and those whose last name component is in no_decay go undecayed."""
    decay, plain = [], []
    for name, p in named:
        if p.requires_grad:
            undecayed = p.ndim <= 1 or name.rsplit(".", 1)[-1] in no_decay
            (plain if exclude_bias_bn and undecayed else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "weights"},
              {"params": plain, "weight_decay": 0.0, "name": "biases_norms"}]
    return [{"lr_scale": 1.0, "fixed_lr": False, **g, **extra} for g in groups if g["params"]]


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's target-momentum schedule: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from base to 1."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1.0) / 2.0


@torch.no_grad()
def ema_(target: list[torch.Tensor], online: list[torch.Tensor], m: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_o for every pair, as one fused multi-tensor op."""
    torch._foreach_lerp_(target, online, 1.0 - m)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with requires_grad off: the starting point of a momentum/target network."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
