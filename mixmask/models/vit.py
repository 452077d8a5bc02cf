"""Vision Transformers from timm (Dosovitskiy et al. 2021, arXiv 2010.11929) for masked image modelling
(MAE: He et al. 2021, arXiv 2111.06377; CMAE: arXiv 2205.10546; docs/methods.md §8).

The encoder is timm's VisionTransformer itself (``self.vit``: its state dict has timm's names, so it
exports to ``timm.create_model("vit_tiny_patch16_224", img_size=..., patch_size=..., num_classes=0)``);
attention is never written here. ``tokens`` runs it MAE-style on the kept patches only:

    t = patch_embed(x) (+ pos_embed of each patch)        (N, L, D), L = (H/p)(W/p)
    t = t[keep]                                           (N, K, D)  only the kept tokens from here on
    t = [cls (+ its pos_embed); t] -> blocks -> norm      (N, 1 + K, D)

With keep=None and pos=True this is timm's ``forward_features``. pos=False drops every positional
embedding (the position-prediction task reads tokens that do not know where they are).
Pooled features (kNN, probes) = the mean of the normalised patch tokens; ``feature_map`` = the
patch tokens of the last block before the final LayerNorm, as (N, D, H/p, W/p) (ContrastiveCrop
reads sum_c |F_c| of it: after the LayerNorm every token has nearly the same norm).

MAEDecoder: the encoder tokens -> Linear to the decoder width; mask tokens at the dropped positions;
fixed 2-D sin-cos positional embedding; ``depth`` timm Blocks; LayerNorm; Linear to p*p*3 pixels per
patch. depth=0 is the linear head: each masked token is mask_token + pos + the mean of the embedded
visible tokens (the only path from the visible patches to the masked ones without attention).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

ViTArch = Literal["vit_tiny", "vit_small", "vit_base"]
VIT_ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}  # dim, depth, heads


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order, each flattened as (p, p, C)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(t: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W): the inverse of patchify."""
    n, L, d = t.shape
    c = d // (p * p)
    t = t.reshape(n, h // p, w // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", t).reshape(n, c, h, w)


def gather_tokens(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """t (N, L, D), keep (N, K) int64 -> (N, K, D)."""
    return t.gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


class ViTBackbone(nn.Module):
    """timm VisionTransformer (class token, learned positional embedding, no classifier)."""

    def __init__(self, arch: ViTArch = "vit_tiny", image_size: int = 224, patch_size: int = 16, depth: int = 0):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if arch not in VIT_ARCHS:
            raise ValueError(f"unknown ViT {arch!r} (known: {', '.join(VIT_ARCHS)})")
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the image size {image_size}")
        dim, default_depth, heads = VIT_ARCHS[arch]
        self.vit = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=dim,
                                     depth=depth or default_depth, num_heads=heads, num_classes=0,
                                     global_pool="token", qkv_bias=True)
        self.width, self.patch_size, self.grid = dim, patch_size, image_size // patch_size
        self.num_patches = self.grid * self.grid

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None, pos: bool = True,
               norm: bool = True) -> torch.Tensor:
        """(N, 3, H, W), keep (N, K) or None -> (N, 1 + K, D) (class token first)."""
        v = self.vit
        t = v.patch_embed(x)  # (N, L, D)
        cls = v.cls_token.expand(t.shape[0], -1, -1)  # (N, 1, D)
        if pos:
            t = t + v.pos_embed[:, 1:]
            cls = cls + v.pos_embed[:, :1]
        if keep is not None:
            t = gather_tokens(t, keep)  # (N, K, D)
        t = v.blocks(v.norm_pre(torch.cat([cls, t], dim=1)))
        return v.norm(t) if norm else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D)
        return self.tokens(x)[:, 1:].mean(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D, H/p, W/p)
        t = self.tokens(x, norm=False)[:, 1:]  # (N, L, D)
        return t.transpose(1, 2).reshape(t.shape[0], self.width, self.grid, self.grid)


class MAEDecoder(nn.Module):
    """Encoder tokens of the kept patches -> pixel predictions for every patch (N, L, p*p*3)."""

    def __init__(self, width: int, grid: int, patch_size: int, dim: int = 256, depth: int = 1, heads: int = 8):
        super().__init__()
        from timm.layers import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", build_sincos2d_pos_embed([grid, grid], dim).reshape(1, grid * grid, dim),
                             persistent=False)  # fixed: (1, L, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)

    def forward(self, enc: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """enc (N, 1 + K, D) encoder output, keep (N, K) -> (N, L, p*p*3)."""
        y = self.embed(enc)  # (N, 1 + K, dim)
        n, L = y.shape[0], self.pos.shape[1]
        full = self.mask_token.to(y.dtype).expand(n, L, -1)
        if len(self.blocks) == 0:  # the linear head: masked tokens see the mean of the visible ones
            full = full + y[:, 1:].mean(1, keepdim=True)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y[:, 1:])  # (N, L, dim)
        full = full + self.pos.to(y.dtype)
        out = self.blocks(torch.cat([y[:, :1], full], dim=1))[:, 1:]  # (N, L, dim)
        return self.pred(self.norm(out))
