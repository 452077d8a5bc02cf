"""Supervised fine-tuning of a pretrained backbone: one more framework on the same engine (docs/methods.md §11).

    logits = W f(x1) + b                       # f: the pretrained backbone, trained end to end
    L = CE_eps(logits, y)                      # label smoothing eps (Szegedy et al. 2016):
                                               # target (1 - eps) on y, eps / C spread over the C classes

``train.py finetune`` trains it on every labelled training image; ``train.py semisup`` on a fixed
per-class share of them (SimCLR's semi-supervised protocol, Chen et al. 2020, arXiv 2002.05709 §B.5:
1% or 10% of the labels, the whole network fine-tuned). The views are one RandomResizedCrop + flip per
image (the loaders' one-view mode: ``batch.x2`` is None). The head starts at N(0, 0.01) weights and
zero bias (MoCo's linear classifier init).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mixmask.batch import Batch
from mixmask.frameworks.base import Framework
from mixmask.models import BackboneSpec, make_backbone


@dataclass
class FinetuneConfig:
    """``finetune`` and ``semisup``: the fine-tuning recipe (its own optimiser and schedule)."""

    epochs: int = 100  # SimCLR: 60 (1% labels) / 30 (10%); full-data fine-tunes: ~100
    optimizer: Literal["sgd", "adamw"] = "sgd"  # momentum SGD (ResNets) or AdamW (ViTs); mixmask/optim.py
    lr: float = 0.1  # base lr for a global batch of 256 (linearly scaled)
    momentum: float = 0.9  # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 1e-4  # ResNet fine-tunes; 0.05 is usual for ViTs with AdamW
    warmup_epochs: float = 0.0  # linear warm-up before the cosine decay
    label_smoothing: float = 0.0  # eps of the smoothed cross-entropy (0.1 in ViT fine-tunes)
    batch_size: int = 0  # per process; 0 = data.batch_size (a 1% subset may need a smaller one)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (Inception-style)
    fraction: float = 0.1  # semisup only: the labelled share of each class (SimCLR: 0.01 or 0.1)
    subset: str = ""  # semisup: a subset file (subset.json of an earlier run) to reuse; "" = drawn from run.seed
    eval_every: int = 0  # epochs between val top-1 monitors (0 = only at the end)

    def problems(self) -> list[str]:
        out = []
        if self.epochs < 1:
            out.append("epochs must be >= 1")
        if self.lr <= 0:
            out.append("lr must be > 0")
        if not 0 <= self.label_smoothing < 1:
            out.append("label_smoothing must be in [0, 1)")
        if not 0 < self.fraction <= 1:
            out.append("fraction must be in (0, 1]")
        if self.batch_size < 0 or self.batch_size == 1:
            out.append("batch_size must be 0 (data.batch_size) or >= 2")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            out.append("crop_scale must satisfy 0 < lo <= hi <= 1")
        return out


class Supervised(Framework):
    """A backbone and a linear classifier, trained with (smoothed) cross-entropy on batch.x1."""

    def __init__(self, num_classes: int, *, arch: BackboneSpec, label_smoothing: float = 0.0):
        super().__init__()
        self.backbone = make_backbone(arch)
        self.head = nn.Linear(self.backbone.width, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = label_smoothing

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, classes)
        return self.head(self.backbone(x))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.logits(batch.x1).float()  # (N, classes); the loss in float32 under autocast
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=self.label_smoothing)
        top1 = (logits.argmax(1) == batch.labels).float().mean() * 100
        return {"loss": loss, "train_top1": top1.detach()}
