"""Backbones and heads: ResNets with a feature map (resnet.py), projector/predictor MLPs (heads.py)."""

from mixmask.models.heads import Encoder, mlp
from mixmask.models.resnet import Arch, Backbone, Stem

__all__ = ["Arch", "Backbone", "Encoder", "Stem", "mlp"]
