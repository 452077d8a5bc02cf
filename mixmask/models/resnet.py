"""ResNet backbones (He et al. 2016, arXiv 1512.03385) from torchvision's ResNet class.

ResNet-10/18/34/50 without the classifier: ``forward`` returns the globally pooled feature (N, C) and
``feature_map`` the last spatial map (N, C, h, w) (saliency and ContrastiveCrop read it).
``stem="small"`` replaces the 7x7/2 conv and the max-pool by a 3x3/1 conv for small images
(CIFAR-style, <= 64 px), as is usual for CIFAR/Tiny-ImageNet.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.models import resnet

from mixmask.models.norm import BatchNorm2d

Arch = Literal["resnet10", "resnet18", "resnet34", "resnet50"]
Stem = Literal["imagenet", "small"]

_LAYOUT = {
    "resnet10": (resnet.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
}


class Backbone(nn.Module):
    """A torchvision ResNet trunk; ``width`` = C, the pooled feature size."""

    def __init__(self, arch: Arch, stem: Stem = "imagenet"):
        super().__init__()
        if arch not in _LAYOUT:
            raise ValueError(f"unknown arch {arch!r} (known: {', '.join(_LAYOUT)})")
        block, layers = _LAYOUT[arch]
        net = resnet.ResNet(block, layers, zero_init_residual=False, norm_layer=BatchNorm2d)  # groupable BN (norm.py)
        if stem == "small":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.width = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C, H/32, W/32)
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C)
        return torch.flatten(self.net.avgpool(self.feature_map(x)), 1)
