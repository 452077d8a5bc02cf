"""CMAE: a ViT masked autoencoder with a smaller decoder and two encoder-side tasks, contrastive learning
and token-position prediction ("Improvements to Self-Supervised Representation Learning for Masked Image
Modeling", arXiv 2205.10546; MAE: He et al. 2021, arXiv 2111.06377). docs/methods.md §8.

Only the abstract was published (no code); every choice it leaves open is ours and stated here:

    keep = batch.keep                                   (N, K) kept patches of x1 (the input pipeline,
                                                        kernels/tokens.py: random, ratio r = mask_ratio)
    h = E(x1[keep])                                     (N, 1 + K, D) online ViT on the kept tokens only
    1. reconstruction (MAE): y = Dec(h, keep)           (N, L, p*p*3) a decoder of decoder_depth timm
       blocks (MAE: 8; CMAE: "even smaller", 1-2; 0 = a linear head), width decoder_dim
       L_rec_j = mean over the MASKED patches l of mean_d (y_jld - norm_pix(patchify(x1))_jld)^2
    2. contrastive (on the encoder): q = normalize(pred(proj(mean_k h_jk)))  pooled visible tokens of x1
       z = normalize(proj'(E'(x2)))     momentum encoder E' (+ proj'), ALL tokens of the second view
       contrastive = "infonce": L_con_j = InfoNCE(q_j, z_j; the batch's other z as negatives,
                     gathered from every process), temperature T (MoCo v3's form);
                     "byol": L_con_j = 2 - 2 cos(q_j, z_j)
       E', proj' <- tau E' + (1 - tau) (E, proj) after each step, tau from momentum to 1 on a cosine
    3. position prediction (on the encoder): u = E(x1[keep]) run AGAIN with no positional embedding at
       all (neither the patches' nor the class token's), so a token's output can only know where it is
       from its own content and the other kept patches'; logits = W u_k (N, K, L);
       L_pos_j = mean_k CE(logits_jk, keep_jk). Same weights as the main pass, a second forward over
       the K kept tokens (a quarter of the patches at r = 0.75).
    L = w_reconstruction L_rec + w_contrastive L_con + w_position L_pos     (mean over the batch)

Only x1 is masked and reconstructed (one direction; symmetrising would double the encoder cost).
A loss weight of 0 removes that branch's modules (no unused parameters under DDP; the ablation's MAE
baseline has w_contrastive = w_position = 0).
Pooled features for kNN/probes: the mean of the online encoder's normalised patch tokens, all patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mixmask import distributed as D
from mixmask.batch import Batch
from mixmask.frameworks.base import Framework, cosine_momentum, ema_, frozen_copy, split_bias_bn
from mixmask.losses import info_nce_batch, masked_mse, normalize, normalized_mse, position_ce
from mixmask.models import BackboneSpec, Encoder, MAEDecoder, ViTBackbone, make_backbone, mlp
from mixmask.models.vit import patchify


@dataclass
class CMAEConfig:
    mask_ratio: float = 0.75  # r: fraction of x1's patches the encoder never sees (MAE's 0.75)
    decoder_depth: int = 1  # transformer blocks of the decoder (MAE: 8; CMAE: 1-2); 0 = a linear head
    decoder_dim: int = 256  # decoder width (MAE: 512)
    decoder_heads: int = 8
    norm_pix: bool = True  # reconstruct per-patch normalised pixels (MAE's better target)
    w_reconstruction: float = 1.0
    w_contrastive: float = 0.5  # 0 = no contrastive branch (no momentum encoder)
    w_position: float = 0.1  # 0 = no position head
    contrastive: Literal["infonce", "byol"] = "infonce"  # the contrastive loss form (docstring)
    temperature: float = 0.2  # InfoNCE temperature (MoCo v3's ViT value)
    dim: int = 256  # contrastive projection size
    mlp_hidden: int = 2048  # projector and predictor hidden width
    momentum: float = 0.996  # tau_base of the momentum encoder (cosine to 1, as BYOL / MoCo v3)

    def problems(self) -> list[str]:
        return [m for ok, m in [
            (0 < self.mask_ratio < 1, "mask_ratio must be in (0, 1)"),
            (self.decoder_depth >= 0, "decoder_depth must be >= 0"),
            (self.decoder_dim >= 1 and self.decoder_heads >= 1 and self.decoder_dim % self.decoder_heads == 0,
             "decoder_dim must be a positive multiple of decoder_heads"),
            (self.w_reconstruction >= 0, "w_reconstruction must be >= 0"),
            (self.w_contrastive >= 0, "w_contrastive must be >= 0"), (self.w_position >= 0, "w_position must be >= 0"),
            (self.w_reconstruction + self.w_contrastive + self.w_position > 0,
             "w_reconstruction + w_contrastive + w_position must be > 0 (at least one loss)"),
            (self.temperature > 0, "temperature must be > 0"), (self.dim >= 1, "dim must be >= 1"),
            (self.mlp_hidden >= 1, "mlp_hidden must be >= 1"), (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
        ] if not ok]


class CMAE(Framework):
    Config = CMAEConfig
    views_batchable = False  # one view per encoder (x1's kept tokens online, x2 momentum), a ViT: no model.batch_views
    masks_tokens = True  # the input pipeline must fill batch.keep (mixmask/mixing/stage.py TokenMasking)
    vit_only = True

    def __init__(self, cfg: CMAEConfig = CMAEConfig(), *, arch: str | BackboneSpec = "vit_tiny", stem: str = "imagenet",
                 seed: int = 0, group=None):
        super().__init__()
        self.cfg, self.group = cfg, group
        backbone = make_backbone(arch, stem)
        if not isinstance(backbone, ViTBackbone):
            raise ValueError(f"CMAE needs a ViT backbone, got {arch!r}")
        self.encoder = backbone
        self.decoder = None
        if cfg.w_reconstruction > 0:
            self.decoder = MAEDecoder(backbone.width, backbone.grid, backbone.patch_size, cfg.decoder_dim,
                                      cfg.decoder_depth, cfg.decoder_heads)
        self.online_head = self.predictor = self.target = self.position_head = None
        if cfg.w_contrastive > 0:
            self.online_head = mlp([backbone.width, cfg.mlp_hidden, cfg.dim])
            self.predictor = mlp([cfg.dim, cfg.mlp_hidden, cfg.dim])
            self.target = frozen_copy(Encoder(backbone, self.online_head))
        if cfg.w_position > 0:
            self.position_head = nn.Linear(backbone.width, backbone.num_patches)

    @property
    def backbone(self) -> ViTBackbone:
        return self.encoder

    def target_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.target.backbone.feature_map(x) if self.target is not None else self.feature_map(x)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.keep is None:
            raise ValueError("CMAE needs batch.keep: build the stage with TokenMasking (mixmask/mixing/stage.py)")
        cfg, keep, p = self.cfg, batch.keep, self.encoder.patch_size
        h = self.encoder.tokens(batch.x1, keep)  # (N, 1 + K, D)
        out, loss = {}, 0.0
        if self.decoder is not None:
            pred = self.decoder(h, keep)  # (N, L, p*p*3)
            masked = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device).scatter(1, keep, False)  # (N, L)
            rec = masked_mse(pred, patchify(batch.x1, p), masked, cfg.norm_pix)  # (N,)
            out["loss_rec"], loss = rec.mean(), loss + cfg.w_reconstruction * rec
        if self.target is not None:
            q = self.predictor(self.online_head(h[:, 1:].mean(1)))  # (N, dim)
            with torch.no_grad():
                z = self.target(batch.x2)  # (N, dim): all tokens of the second view
            if cfg.contrastive == "infonce":
                keys = D.gather(normalize(z), self.group)  # (W N, dim)
                labels = torch.arange(q.shape[0], device=q.device) + D.rank(self.group) * q.shape[0]
                con = info_nce_batch(normalize(q), keys, labels, cfg.temperature)  # (N,)
            else:
                con = normalized_mse(q, z)  # (N,)
            out["loss_con"], loss = con.mean(), loss + cfg.w_contrastive * con
        if self.position_head is not None:
            u = self.encoder.tokens(batch.x1, keep, pos=False)[:, 1:]  # (N, K, D) no positional embedding
            logits = self.position_head(u)  # (N, K, L)
            pos = position_ce(logits, keep)  # (N,)
            out["loss_pos"], loss = pos.mean(), loss + cfg.w_position * pos
            out["pos_acc"] = (logits.detach().argmax(-1) == keep).float().mean()
        out["loss"] = loss.mean()
        return out

    def param_groups(self, weight_decay: float, exclude_bias_bn: bool = False) -> list[dict]:
        """As every framework, and with exclude_bias_bn the token and positional embeddings too (MAE)."""
        return split_bias_bn(self.named_parameters(), weight_decay, exclude_bias_bn,
                             no_decay=("cls_token", "pos_embed", "mask_token"))

    def tau(self, step: int, total_steps: int) -> float:
        return cosine_momentum(self.cfg.momentum, step, total_steps)

    def after_step(self, step: int, total_steps: int) -> None:
        if self.target is not None:
            online = list(self.encoder.parameters()) + list(self.online_head.parameters())
            ema_(list(self.target.parameters()), online, self.tau(step, total_steps))
