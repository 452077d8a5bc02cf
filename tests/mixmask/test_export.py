"""mixmask/export.py: the exported backbones load into torchvision / timm and compute the same features as the
framework's online backbone; the detectron2 names follow MoCo's conversion; bad checkpoints fail in one line.

Models have random weights and perturbed BN running statistics (eval mode reads them), and the momentum/target
copies differ from the online ones, so exporting the wrong tensors changes the features.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from mixmask.export import (ExportError, backbone_prefix, backbone_state, check_backbone, detectron2_name, export,
                            read_config)
from mixmask.frameworks import FRAMEWORKS
from mixmask.models import BackboneSpec, make_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def perturbed(framework: str, spec: BackboneSpec, **cfg) -> nn.Module:
    """FRAMEWORKS[framework] with every float tensor moved off its init (BN running stats included)."""
    cls = FRAMEWORKS[framework]
    model = cls(cls.Config(**cfg), arch=spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or t.ndim <= 1:
                t.add_(0.1 * noise)
            else:
                t.add_(0.02 * noise)
    return model.eval()


def checkpoint(tmp_path, model: nn.Module, framework: str, spec: BackboneSpec, config: bool = True):
    """model.safetensors (+ config.json as save_checkpoint writes it) in tmp_path/ckpt."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    if config:
        stored = {"model": {"framework": framework, "arch": spec.arch, "stem": spec.stem,
                            "patch_size": spec.patch_size, "vit_depth": spec.vit_depth},
                  "data": {"image_size": spec.image_size}, framework: {}}
        (ckpt / "config.json").write_text(json.dumps({"config": stored}))
    return ckpt


def same_features(net: nn.Module, backbone: nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), backbone.eval()(x))


def run_recipe(entry: dict, out, monkeypatch) -> nn.Module:
    """export.json's one-line recipe, run in the export folder -> its `net`."""
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(entry["load"], scope)
    return scope["net"]


SMALL10 = BackboneSpec("resnet10", "small", image_size=32)


@pytest.fixture(scope="module")
def moco10(tmp_path_factory):
    """moco_v2 on a small-stem ResNet-10, exported in every format."""
    tmp = tmp_path_factory.mktemp("moco10")
    model = perturbed("moco_v2", SMALL10, queue=16)
    out = tmp / "export"
    return model, out, export(checkpoint(tmp, model, "moco_v2", SMALL10), None, out)


def test_torchvision_resnet10_small_stem(moco10, monkeypatch):
    model, out, result = moco10
    sd = load_file(str(out / "backbone_torchvision.safetensors"))
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    r = net.load_state_dict(sd, strict=False)
    assert set(r.missing_keys) == {"fc.weight", "fc.bias"} and r.unexpected_keys == []
    net.fc = nn.Identity()
    same_features(net, model.backbone, 32)
    with pytest.raises(AssertionError):  # the momentum encoder's features differ: the test can tell them apart
        same_features(net, model.encoder_k.backbone, 32)
    entry = result["files"]["backbone_torchvision.safetensors"]
    assert entry["absent"] == ["fc.weight", "fc.bias"] and "maxpool" in entry["load"]
    recipe = run_recipe(entry, out, monkeypatch)
    recipe.fc = nn.Identity()
    same_features(recipe, model.backbone, 32)
    with safe_open(str(out / "backbone_torchvision.safetensors"), "pt") as f:
        assert {k: f.metadata()[k] for k in ("arch", "stem", "format")} == \
            {"arch": "resnet10", "stem": "small", "format": "torchvision"}


def test_timm_resnet10_small_stem(moco10, monkeypatch):
    model, out, result = moco10
    net = timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=0)
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.load_state_dict(load_file(str(out / "backbone_timm.safetensors")), strict=True)
    same_features(net, model.backbone, 32)
    same_features(run_recipe(result["files"]["backbone_timm.safetensors"], out, monkeypatch), model.backbone, 32)


def test_export_json_describes_the_files(moco10):
    _, out, result = moco10
    stored = json.loads((out / "export.json").read_text())
    assert stored == result
    assert {k: stored[k] for k in ("arch", "stem", "image_size", "depth", "framework")} == \
        {"arch": "resnet10", "stem": "small", "image_size": 32, "depth": 10, "framework": "moco_v2"}
    assert sorted(stored["files"]) == sorted(p.name for p in out.iterdir() if p.name != "export.json") == [
        "backbone_detectron2.pkl", "backbone_detectron2.safetensors", "backbone_timm.safetensors",
        "backbone_torchvision.safetensors"]
    assert stored["patch_size"] is None and stored["skipped"] == {}
    assert stored["source"].endswith("ckpt/model.safetensors")


def test_detectron2_names(moco10):
    _, out, _ = moco10
    tv = load_file(str(out / "backbone_torchvision.safetensors"))
    d2 = load_file(str(out / "backbone_detectron2.safetensors"))
    assert len(d2) == len(tv)
    assert not any(s in k for k in d2 for s in ("layer", "bn", "downsample"))
    pairs = {"stem.conv1.weight": "conv1.weight", "stem.conv1.norm.running_mean": "bn1.running_mean",
             "res2.0.conv1.norm.running_mean": "layer1.0.bn1.running_mean",
             "res2.0.conv2.weight": "layer1.0.conv2.weight",
             "res3.0.shortcut.weight": "layer2.0.downsample.0.weight",
             "res3.0.shortcut.norm.running_var": "layer2.0.downsample.1.running_var",
             "res5.0.conv2.norm.bias": "layer4.0.bn2.bias"}
    for d2_name, tv_name in pairs.items():
        torch.testing.assert_close(d2[d2_name], tv[tv_name], rtol=0, atol=0)
    assert detectron2_name("layer4.2.bn3.weight") == "res5.2.conv3.norm.weight"  # Bottleneck's third conv
    blob = pickle.loads((out / "backbone_detectron2.pkl").read_bytes())
    assert blob["__author__"] == "mixmask" and blob["matching_heuristics"] is True
    assert blob["model"].keys() == d2.keys()
    assert all(isinstance(v, np.ndarray) and np.array_equal(v, d2[k].numpy()) for k, v in blob["model"].items())


def test_resnet50_imagenet_stem(tmp_path):
    spec = BackboneSpec("resnet50", "imagenet", image_size=64)
    model = perturbed("simclr", spec)
    result = export(checkpoint(tmp_path, model, "simclr", spec), None, tmp_path / "out",
                    formats=("torchvision", "timm"))
    assert result["depth"] == 50
    assert sorted(result["files"]) == ["backbone_timm.safetensors", "backbone_torchvision.safetensors"]
    net = torchvision.models.resnet50(weights=None)
    r = net.load_state_dict(load_file(str(tmp_path / "out" / "backbone_torchvision.safetensors")), strict=False)
    assert set(r.missing_keys) == {"fc.weight", "fc.bias"} and r.unexpected_keys == []
    net.fc = nn.Identity()
    same_features(net, model.backbone, 64)
    net = timm.create_model("resnet50", pretrained=False, num_classes=0)
    net.load_state_dict(load_file(str(tmp_path / "out" / "backbone_timm.safetensors")), strict=True)
    same_features(net, model.backbone, 64)


def test_vit_to_timm(tmp_path, monkeypatch):
    spec = BackboneSpec("vit_tiny", image_size=32, patch_size=4, vit_depth=1)
    model = perturbed("cmae", spec)
    result = export(checkpoint(tmp_path, model, "cmae", spec), None, tmp_path / "out")
    assert set(result["skipped"]) == {"torchvision", "detectron2"}
    assert list(result["files"]) == ["backbone_timm.safetensors"]
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1,
                            num_classes=0, global_pool="avg", fc_norm=False)
    net.load_state_dict(load_file(str(tmp_path / "out" / "backbone_timm.safetensors")), strict=True)
    same_features(net, model.backbone, 32)
    with pytest.raises(AssertionError):  # CMAE's target encoder is another ViT
        same_features(net, model.target.backbone, 32)
    recipe = run_recipe(result["files"]["backbone_timm.safetensors"], tmp_path / "out", monkeypatch)
    same_features(recipe, model.backbone, 32)


def test_backbone_prefix_is_the_online_backbone():
    expected = {"moco_v2": "encoder_q.backbone.", "simclr": "encoder.backbone.", "byol": "online.backbone.",
                "simsiam": "encoder.backbone.", "barlow_twins": "encoder.backbone.", "cmae": "encoder."}
    assert {name: backbone_prefix(name) for name in expected} == expected
    bare = make_backbone(SMALL10).state_dict()
    assert backbone_state(bare, "").keys() == {k.removeprefix("net.") for k in bare}


def test_missing_config(tmp_path):
    model = perturbed("moco_v2", SMALL10, queue=16)
    ckpt = checkpoint(tmp_path, model, "moco_v2", SMALL10, config=False)
    with pytest.raises(ExportError, match="no config.json") as e:
        export(ckpt, None, tmp_path / "out")
    assert "\n" not in str(e.value)
    cfg = read_config(ckpt / "model.safetensors", arch="resnet10", stem="small", framework="moco_v2")
    assert export(ckpt, cfg, tmp_path / "out", formats=("timm",))["arch"] == "resnet10"


def test_mismatched_architecture(tmp_path):
    spec18 = BackboneSpec("resnet18", "small", image_size=32)
    ckpt = checkpoint(tmp_path, perturbed("simclr", spec18), "simclr", spec18)
    cfg = json.loads((ckpt / "config.json").read_text())["config"]
    cfg["model"]["arch"] = "resnet10"
    with pytest.raises(ExportError, match=r"holds layer1\.1\.\S+ of shape .*, config says resnet10 \(no such key") as e:
        export(ckpt, cfg, tmp_path / "out")
    assert "\n" not in str(e.value)
    sd = backbone_state(load_file(str(ckpt / "model.safetensors")), "encoder.backbone.")
    stem_mismatch = r"conv1\.weight of shape \(64, 3, 3, 3\), config says resnet18 \(\(64, 3, 7, 7"
    with pytest.raises(ExportError, match=stem_mismatch):
        check_backbone(sd, BackboneSpec("resnet18", "imagenet"))
    check_backbone(sd, spec18)
    cfg["model"].update(arch="resnet18", framework="byol")
    with pytest.raises(ExportError, match="no keys under 'online.backbone.'"):
        export(ckpt, cfg, tmp_path / "out")
