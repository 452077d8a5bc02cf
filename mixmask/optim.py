"""Optimisers by name (docs/methods.md §5): SGD with momentum, LARS (You et al. 2017, arXiv 1708.03888)
from timm, or AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101; the MAE/ViT recipes). Parameter groups come from the framework (``param_groups``): a group with weight_decay 0 is
also skipped by timm's LARS trust-ratio adaptation, which is how the papers exclude biases and BN.
"""

from __future__ import annotations

import torch


def _sgd(groups: list[dict], lr: float, momentum: float, lars_trust: float, betas) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def _lars(groups: list[dict], lr: float, momentum: float, lars_trust: float, betas) -> torch.optim.Optimizer:
    from timm.optim import Lars

    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=lars_trust)


def _adamw(groups: list[dict], lr: float, momentum: float, lars_trust: float, betas) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


OPTIMIZERS = {"sgd": _sgd, "lars": _lars, "adamw": _adamw}  # optim.optimizer -> builder(groups, lr, momentum, lars_trust, betas)


def build_optimizer(name: str, groups: list[dict], *, lr: float, momentum: float = 0.9,
                    lars_trust: float = 0.001, betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](groups, lr, momentum, lars_trust, betas)
