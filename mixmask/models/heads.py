"""Projector and predictor MLPs of the Siamese frameworks (docs/methods.md §4).

One builder for every head: ``mlp([d0, d1, ..., dL])`` is Linear(d0, d1) -> [BN] -> ReLU -> ... ->
Linear(d_{L-1}, dL) [-> BN]. With BatchNorm the hidden Linear layers have no bias (BN's shift
replaces it). The heads of the papers:
    MoCo v2   mlp([C, 2048, 128], bn=False)
    SimCLR    mlp([C, 2048, 128])
    BYOL      projector mlp([C, 4096, 256]), predictor mlp([256, 4096, 256])
    SimSiam   projector mlp([C, 2048, 2048, 2048], last_bn=True), predictor mlp([2048, 512, 2048])
    Barlow    mlp([C, 8192, 8192, 8192], last_bias=False)
"""

from __future__ import annotations

from torch import nn

from mixmask.models.norm import BatchNorm1d


class Encoder(nn.Module):
    """backbone + projection head: forward (N, 3, H, W) -> (N, D); features -> (N, C)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


def mlp(dims: list[int], *, bn: bool = True, last_bn: bool = False, last_bias: bool = True) -> nn.Sequential:
    """An MLP over ``dims``; last_bn adds a BatchNorm without affine parameters after the last Linear
    (BatchNorm1d of mixmask/models/norm.py: torch's, groupable per view)."""
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {dims}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last_bias if last else not bn))
        if last:
            if last_bn:
                layers.append(BatchNorm1d(b, affine=False))
        else:
            if bn:
                layers.append(BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
