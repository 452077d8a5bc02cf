"""Export the online backbone of a pretraining checkpoint for downstream tools (torchvision, timm, detectron2).

Only the online backbone (the framework's ``.backbone``) is exported: never momentum/target encoders,
heads, decoders or queues. Files written to ``out_dir`` (each .safetensors carries metadata arch, stem,
format; ``export.json`` lists every file with a one-line loading recipe and the target keys it lacks):

- ``backbone_torchvision.safetensors`` (ResNets): torchvision's names (conv1.weight, bn1.*, layer1.0.conv1.weight,
  layer1.0.downsample.{0,1}.*, ...), no fc. ``torchvision.models.resnet50(weights=None).load_state_dict(sd,
  strict=False)`` misses exactly fc.weight and fc.bias (resnet10 has no torchvision constructor:
  ``torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])``).
- ``backbone_timm.safetensors``: ResNets: timm's ResNet uses torchvision's names (timm 1.0.29), so the same
  tensors, loaded strictly into ``timm.create_model("resnet50", num_classes=0)`` (resnet10: timm has none,
  ``timm.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0)``). ViTs: timm's VisionTransformer
  names (ViTBackbone keeps them), loaded strictly into ``timm.create_model("vit_tiny_patch16_224",
  img_size=S, patch_size=P, depth=D, num_classes=0, global_pool="avg", fc_norm=False)``, whose forward is
  ViTBackbone.forward (the mean of the normalised patch tokens); global_pool="token" gives the class token.
- ``backbone_detectron2.pkl`` and ``.safetensors`` (ResNets only; ViTs are skipped): MoCo's
  convert-pretrain-to-detectron2 names: conv1 -> stem.conv1, bn1 -> stem.conv1.norm, layerN -> res{N+1},
  bnK -> convK.norm, downsample.0 -> shortcut, downsample.1 -> shortcut.norm. The .pkl ({"model": {name:
  numpy array}, "__author__": "mixmask", "matching_heuristics": True}) is for ``MODEL.WEIGHTS`` (detectron2's
  DetectionCheckpointer reads .pkl), with ``MODEL.RESNETS.STRIDE_IN_1X1=False``, ``MODEL.PIXEL_MEAN/STD`` =
  the pretraining normalisation x 255 in RGB (torchvision's by default) and ``INPUT.FORMAT=RGB``, as in
  MoCo's detection configs; the .safetensors holds the same tensors for tools that avoid pickle.
  detectron2 builds ResNet-18/34/50 (18/34 with RES2_OUT_CHANNELS=64), not ResNet-10.

Stem "small" (3x3/1 conv, no max-pool) in torchvision or timm: before loading,
``net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = torch.nn.Identity()``.
detectron2 has no such stem: its stem.conv1.weight (7x7) does not match the exported 3x3 one.
"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixmask.checkpoint import resolve_weights
from mixmask.models import VIT_ARCHS, BackboneSpec, is_vit, make_backbone

FORMATS = ("torchvision", "timm", "detectron2")
SMALL_STEM = "net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = torch.nn.Identity(); "


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (one line)."""


@functools.cache
def backbone_prefix(framework: str) -> str:
    """The state-dict prefix of ``framework``'s online backbone (e.g. "encoder_q.backbone." for moco_v2),
    found by building a tiny instance and locating its ``.backbone`` module."""
    from mixmask.frameworks import FRAMEWORKS

    if framework not in FRAMEWORKS:
        raise ExportError(f"unknown framework {framework!r} (known: {', '.join(FRAMEWORKS)})")
    cls = FRAMEWORKS[framework]
    tiny = BackboneSpec("vit_tiny", image_size=16, patch_size=8, vit_depth=1)  # the path does not depend on the size
    spec = tiny if cls.vit_only else BackboneSpec("resnet10")
    model = cls(cls.Config(), arch=spec)
    return next(name + "." for name, m in model.named_modules() if m is model.backbone)


def backbone_state(model_state: dict[str, torch.Tensor], framework_prefix: str) -> dict[str, torch.Tensor]:
    """The online backbone's tensors under torchvision names (ResNets: ``<prefix>net.`` stripped) or timm names
    (ViTs: ``<prefix>vit.`` stripped). framework_prefix = backbone_prefix(framework); "" for a backbone's own state."""
    sd = {k[len(framework_prefix):]: v for k, v in model_state.items() if k.startswith(framework_prefix)}
    for inner in ("net.", "vit."):
        if sd and all(k.startswith(inner) for k in sd):
            return {k[len(inner):]: v for k, v in sd.items()}
    return sd


def check_backbone(model_state: dict[str, torch.Tensor], spec: BackboneSpec, source: str = "the checkpoint") -> None:
    """ExportError naming the first key whose presence or shape differs from ``make_backbone(spec)``'s
    (model_state: backbone_state's output or a backbone's own state_dict)."""
    sd = backbone_state(model_state, "")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ref = backbone_state(make_backbone(spec).state_dict(), "")
    for k in [*ref, *(k for k in sd if k not in ref)]:
        a, b = (tuple(d[k].shape) if k in d else None for d in (sd, ref))
        if a != b:
            held = f"holds {k} of shape {a}" if a is not None else f"lacks {k}"
            raise ExportError(f"{source} {held}, config says {spec.arch} ({'no such key' if b is None else b})")


def read_config(weights: Path, **model) -> dict:
    """The resolved config stored beside the weights (config.json's "config"); without one, {"model": model}
    from the given model fields (arch required; framework, stem, patch_size, vit_depth optional)."""
    stored = Path(weights).parent / "config.json"
    if stored.is_file():
        return json.loads(stored.read_text())["config"]
    if "arch" not in model:
        raise ExportError(f"no config.json beside {weights} and no arch given: cannot tell the architecture")
    return {"model": model}


def detectron2_name(k: str) -> str:
    """A torchvision ResNet name -> detectron2's (MoCo's convert-pretrain-to-detectron2.py rules)."""
    k = k if k.startswith("layer") else "stem." + k
    for t in (1, 2, 3, 4):
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _recipes(spec: BackboneSpec, depth: int, mean, std) -> dict[str, tuple[str, list[str], str]]:
    """format -> (one line of Python loading the file into `net`, target keys it lacks, note)."""
    load = ("from safetensors.torch import load_file; "
            "net.load_state_dict(load_file('backbone_{}.safetensors'), strict={})")
    stem = SMALL_STEM if spec.stem == "small" else ""
    if is_vit(spec.arch):
        timm = (f"import timm, torch; net = timm.create_model('{spec.arch}_patch16_224', pretrained=False, "
                f"img_size={spec.image_size}, patch_size={spec.patch_size}, depth={depth}, num_classes=0, "
                "global_pool='avg', fc_norm=False); " + load.format("timm", True))
        return {"timm": (timm, [], "forward = ViTBackbone.forward; global_pool='token' gives the class token")}
    small = spec.arch == "resnet10"
    tv = "torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])" if small else \
        f"torchvision.models.{spec.arch}(weights=None)"
    tm = "timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=0)" if small else \
        f"timm.create_model('{spec.arch}', pretrained=False, num_classes=0)"
    px = lambda v: [round(255 * x, 3) for x in v]  # noqa: E731
    d2 = (f"cfg.MODEL.WEIGHTS = 'backbone_detectron2.pkl'; cfg.MODEL.RESNETS.DEPTH = {depth}; "
          f"cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False; cfg.MODEL.PIXEL_MEAN = {px(mean)}; "
          f"cfg.MODEL.PIXEL_STD = {px(std)}; "
          "cfg.INPUT.FORMAT = 'RGB'" + ("; cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64" if depth < 50 else ""))
    notes = {"small": "stem 'small': replace conv1 by a 3x3/1 conv and maxpool by Identity before loading"}
    d2_note = "; ".join(n for ok, n in [(small, "detectron2 has no ResNet-10"), (spec.stem == "small",
                        "detectron2 has no 3x3/1 stem without max-pool: stem.conv1.weight will not fit")] if ok)
    return {"torchvision": (f"import torch, torchvision; net = {tv}; {stem}" + load.format("torchvision", False),
                            ["fc.weight", "fc.bias"], notes["small"] if stem else ""),
            "timm": (f"import torch, timm; net = {tm}; {stem}" + load.format("timm", True), [],
                     notes["small"] if stem else ""),
            "detectron2": (d2, [], d2_note)}


def export(weights: Path, stored_config: dict | None, out_dir: Path, formats=FORMATS) -> dict:
    """Write the online backbone of ``weights`` (a .safetensors, checkpoint or run dir) in ``formats`` to out_dir.
    stored_config: the resolved config sections ({"model": {...}, "data": {...}}); None = config.json beside
    the weights. -> the dict written to export.json."""
    weights = resolve_weights(weights)
    cfg = read_config(weights) if stored_config is None else stored_config
    m, data = cfg["model"], cfg.get("data", {})
    spec = BackboneSpec(m["arch"], m.get("stem", "imagenet"), data.get("image_size", 224), m.get("patch_size", 16),
                        m.get("vit_depth", 0))
    framework = m.get("framework")
    prefix = backbone_prefix(framework) if framework else ""
    sd = backbone_state(load_file(str(weights)), prefix)
    if not sd:
        raise ExportError(f"checkpoint {weights} holds no keys under {prefix!r} (config says framework {framework})")
    check_backbone(sd, spec, f"checkpoint {weights}")
    vit = is_vit(spec.arch)
    depth = (spec.vit_depth or VIT_ARCHS[spec.arch][1]) if vit else int(spec.arch.removeprefix("resnet"))
    mean, std = data.get("mean", (0.485, 0.456, 0.406)), data.get("std", (0.229, 0.224, 0.225))
    recipes = _recipes(spec, depth, mean, std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    meta = {"arch": spec.arch, "stem": spec.stem, "image_size": str(spec.image_size)}
    if vit:
        meta.update(patch_size=str(spec.patch_size), depth=str(depth))
    result = {"arch": spec.arch, "stem": spec.stem, "image_size": spec.image_size,
              "patch_size": spec.patch_size if vit else None,
              "depth": depth, "framework": framework, "source": str(weights), "mean": list(mean), "std": list(std),
              "files": {}, "skipped": {}}
    for fmt in formats:
        if fmt not in FORMATS:
            raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
        if fmt not in recipes:
            result["skipped"][fmt] = f"{fmt} export is for ResNets only ({spec.arch} is a ViT)"
            continue
        line, absent, note = recipes[fmt]
        tensors = {detectron2_name(k): v for k, v in sd.items()} if fmt == "detectron2" else sd
        name = f"backbone_{fmt}.safetensors"
        save_file(tensors, str(out_dir / name), metadata={**meta, "format": fmt})
        result["files"][name] = {"format": fmt, "load": line, "absent": absent, "note": note}
        if fmt == "detectron2":  # the .pkl is what MODEL.WEIGHTS reads; the .safetensors the same tensors
            blob = {"model": {k: v.numpy() for k, v in tensors.items()}, "__author__": "mixmask",
                    "matching_heuristics": True}
            (out_dir / "backbone_detectron2.pkl").write_bytes(pickle.dumps(blob))
            result["files"]["backbone_detectron2.pkl"] = result["files"].pop(name)
            result["files"][name] = {"format": fmt, "absent": [], "note": "the .pkl's tensors, pickle-free",
                                     "load": f"from safetensors.torch import load_file; sd = load_file('{name}')"}
    (out_dir / "export.json").write_text(json.dumps(result, indent=2))
    return result
