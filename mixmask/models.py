"""Backbones (torchvision ResNets) and the MoCo v2 projection head.

ResNet-10/18/34/50 are built from torchvision's ResNet class. ``stem="small"`` replaces the 7x7/2 conv
and the max-pool by a 3x3/1 conv for small images (CIFAR-style, <= 64 px), as is usual for CIFAR/Tiny-ImageNet.
The classifier is removed: the backbone returns the globally pooled feature (N, C).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.models import resnet

Arch = Literal["resnet10", "resnet18", "resnet34", "resnet50"]

_LAYOUT = {
    "resnet10": (resnet.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
}


def build_backbone(arch: Arch, stem: Literal["imagenet", "small"] = "imagenet") -> tuple[nn.Module, int]:
    """Return (backbone, feature width). backbone: (N, 3, H, W) -> (N, C)."""
    if arch not in _LAYOUT:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(_LAYOUT)})")
    block, layers = _LAYOUT[arch]
    net = resnet.ResNet(block, layers, zero_init_residual=False)
    if stem == "small":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class ProjectionHead(nn.Module):
    """MoCo v2 MLP head: Linear(C, hidden) -> ReLU -> Linear(hidden, dim)."""

    def __init__(self, in_dim: int, hidden: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, dim)
        return self.net(h)


class Encoder(nn.Module):
    """backbone + head; ``features`` gives the pooled backbone output used by kNN and linear probes."""

    def __init__(self, arch: Arch, stem: Literal["imagenet", "small"], dim: int, hidden: int = 0):
        super().__init__()
        self.backbone, self.width = build_backbone(arch, stem)
        self.head = ProjectionHead(self.width, hidden or self.width, dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, dim)
        return self.head(self.backbone(x))
