"""Backbones and heads: ResNets with a feature map (resnet.py), timm ViTs and the MAE decoder (vit.py),
projector/predictor MLPs (heads.py). ``make_backbone`` builds either family from a name or a spec."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mixmask.models.heads import Encoder, mlp
from mixmask.models.resnet import Arch, Backbone, Stem
from mixmask.models.vit import VIT_ARCHS, MAEDecoder, ViTBackbone


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a backbone is built from (ViTs need the image and patch size; ResNets ignore them)."""

    arch: str = "resnet50"
    stem: Stem = "imagenet"  # ResNets only
    image_size: int = 224  # ViTs only: the positional embedding's grid is image_size / patch_size
    patch_size: int = 16  # ViTs only
    vit_depth: int = 0  # ViTs only: blocks (0 = the architecture's own: 12)


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS


def make_backbone(arch: str | BackboneSpec, stem: Stem = "imagenet") -> nn.Module:
    """A ResNet ``Backbone`` or a ``ViTBackbone``: .width, forward -> (N, C), feature_map -> (N, C, h, w)."""
    spec = arch if isinstance(arch, BackboneSpec) else BackboneSpec(arch, stem)
    if is_vit(spec.arch):
        return ViTBackbone(spec.arch, spec.image_size, spec.patch_size, spec.vit_depth)
    return Backbone(spec.arch, spec.stem)


__all__ = ["Arch", "Backbone", "BackboneSpec", "Encoder", "MAEDecoder", "Stem", "ViTBackbone", "is_vit",
           "make_backbone", "mlp"]
