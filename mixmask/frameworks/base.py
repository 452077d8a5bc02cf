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

Views go through an encoder with ``encode_views`` (below): with ``batch_views`` (model.batch_views, set by
train.build_model) the views of one encoder are ONE forward on their concatenation, with BatchNorm
statistics kept per view (mixmask/models/norm.py), the same outputs, gradients and running statistics as
one forward per view.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mixmask.batch import Batch
from mixmask.losses import area_credited
from mixmask.models import Backbone
from mixmask.models.norm import bn_groups


class Framework(nn.Module):
    backbone: Backbone  # the online backbone: what evaluation and export read
    hard_negatives: bool = False  # forward uses batch.hard_negative (frameworks with negatives)
    masks_tokens: bool = False  # forward needs batch.keep (token masking in the input pipeline)
    vit_only: bool = False  # needs a ViT backbone
    batch_views: bool = False  # model.batch_views: encode_views runs an encoder once on all its views
    views_batchable: bool = True  # forward encodes its views with encode_views (False: model.batch_views is an error)

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


def credit_mixes(batch: Batch, z_mixes: Sequence[torch.Tensor], pair_loss, target: torch.Tensor) -> torch.Tensor | None:
    """Sum over the batch's mixed views of area_credited(pair_loss, z, target, perm, lam), z_mixes[i] the
    embedding of batch.mixes[i] (encode_views).  -> (N,) float32, or None without mixed views"""
    total = None
    for m, z in zip(batch.mixes, z_mixes, strict=True):
        part = area_credited(pair_loss, z, target, m.perm, m.lam)
        total = part if total is None else total + part
    return total


def encode_views(encode: Callable[[torch.Tensor], torch.Tensor], xs: Sequence[torch.Tensor],
                 modules: nn.Module | Sequence[nn.Module], batched: bool, splits: int = 1) -> list[torch.Tensor]:
    """[encode(x) for x in xs] with BatchNorm statistics per view, and per each of the ``splits`` contiguous
    chunks of a view (x.chunk(splits): MoCo's split BN; 1 = whole views).

    batched=False: one call of ``encode`` per view (and chunk), in order.
    batched=True: ONE call on torch.cat(xs) while every BatchNorm of ``modules`` (the modules ``encode``
    runs: backbone, heads, predictor) computes batch statistics per group = view x chunk
    (mixmask/models/norm.py bn_groups): the same outputs and gradients, and the same running statistics
    (updated group by group in the same order), as the separate calls; only float rounding of the
    convolutions on a larger batch differs. Fewer, larger kernel calls.
    -> one (N_i, ...) output per view"""
    if not batched:
        if splits == 1:
            return [encode(x) for x in xs]
        return [torch.cat([encode(c) for c in x.chunk(splits)]) for x in xs]
    sizes = [c.shape[0] for x in xs for c in x.chunk(splits)]  # chunk as the separate path does (views only)
    with bn_groups(modules, sizes):
        out = encode(xs[0] if len(xs) == 1 else torch.cat(list(xs)))
    return list(out.split([x.shape[0] for x in xs]))


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # model.compile
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # model.compile_backend
RECOMPILE_LIMIT = 64  # torch._dynamo's recompile limit is raised to at least this (its default: 8)


def compile_networks(model: nn.Module, mode: str, dynamic: bool = False, backend: str = "inductor") -> list[str]:
    """torch.compile, IN PLACE (nn.Module.compile), each network of a framework: its direct child modules
    (encoders with their heads, predictors, momentum/target copies, decoders); the loss code between them,
    the queue and the momentum updates stay eager. In place = the module keeps its class, parameters and
    state_dict keys, so checkpoints, resume, export and evaluation are unchanged; evaluation reads
    ``model.backbone`` (a child of a compiled Encoder, called directly) and runs eager.

    mode: "none" (nothing), "default", "reduce-overhead" (CUDA graphs where shapes are static; CPU ignores
    it), "max-autotune". dynamic=False: one graph per input shape, so each new resolution (progressive
    resizing) or batch size compiles once more; dynamic=True: sizes are symbolic from the first compile.
    Guards live per code object (every compiled module runs through nn.Module._call_impl), and each
    network x shape x train/eval x BN grouping is an entry: torch's default limit of 8 would fall back to
    eager (silently slow) after a few resolutions with 3 networks (BYOL), so it is raised to
    RECOMPILE_LIMIT. Returns the names of the compiled children."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {list(COMPILE_MODES)}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend {backend!r} is not one of {list(COMPILE_BACKENDS)}")
    if mode == "none":
        return []
    if backend != "inductor" and mode != "default":
        raise ValueError(f"compile mode {mode!r} needs the inductor backend, not {backend!r}")
    import torch._dynamo

    dyn = torch._dynamo.config
    name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"  # same knob, renamed
    setattr(dyn, name, max(getattr(dyn, name), RECOMPILE_LIMIT))
    compiled = []
    for child_name, child in model.named_children():
        if next(child.parameters(), None) is None and next(child.buffers(), None) is None:
            continue  # nothing to compute with (no such child today)
        child.compile(backend=backend, mode=None if mode == "default" else mode, dynamic=dynamic)
        compiled.append(child_name)
    return compiled


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
