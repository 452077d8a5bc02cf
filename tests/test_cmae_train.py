"""CMAE and ContrastiveCrop end to end through train.py (docs/methods.md §8-9): CMAE trains and resumes
exactly on the torchvision backend (token masks keyed by the step) and trains on DALI and FFCV;
ContrastiveCrop's boxes take effect after the warm-up and survive a resume."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_train import tiny_args
from tests.trainrun import read_metrics, run_train

CMAE_TINY = ["model.framework=cmae", "model.arch=vit_tiny", "model.vit_depth=1", "model.patch_size=8",
             "cmae.decoder_dim=32", "cmae.decoder_heads=2", "cmae.mlp_hidden=32", "cmae.dim=16",
             "data.image_size=32", "data.batch_size=16", "data.workers=0", "optim.epochs=2", "run.knn_every=0",
             "run.knn_k=10", "run.log_every=1", "run.progress=false"]
CCROP = ["ccrop.enabled=true", "ccrop.warmup=1", "ccrop.interval=1", "ccrop.alpha=0.6"]


def cmae_args(root, out, name, *extra):
    return [*CMAE_TINY, f"data.root={root}", f"run.out_dir={out}", f"run.name={name}", *extra]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_cmae_trains_and_resumes_exactly(tiny_data, tmp_path):
    full = run_train(*cmae_args(tiny_data, tmp_path, "full", "run.max_steps=5"))
    assert full.returncode == 0, full.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    assert {"loss_rec", "loss_con", "loss_pos", "pos_acc"} <= set(rows[-1])
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["config"]["model"]["framework"] == "cmae" and summary["steps"] == 5
    assert run_train(*cmae_args(tiny_data, tmp_path, "cut", "run.max_steps=2")).returncode == 0
    second = run_train(*cmae_args(tiny_data, tmp_path, "cut", "run.max_steps=5"))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    ref, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    for step in (3, 4, 5):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
    # the evaluation commands rebuild the ViT from the checkpoint's stored config
    knn = run_train("knn", *cmae_args(tiny_data, tmp_path, "full"))
    assert knn.returncode == 0, knn.stderr[-3000:]


def test_contrastive_crop_takes_effect_after_warmup_and_survives_resume(tiny_data, tmp_path):
    """5 steps per epoch; the boxes are computed before epoch 1 (step 6 on). Until then the run equals one
    without ContrastiveCrop (plain RandomResizedCrop); after, it differs. A run cut inside epoch 1 resumes
    with the checkpoint's boxes: its losses equal the uninterrupted run's."""
    args = ("optim.epochs=3", "run.max_steps=9", "run.checkpoint_every=7", "ccrop.size=64")
    plain = run_train(*tiny_args(tiny_data, tmp_path, "plain", *args[:3]))
    full = run_train(*tiny_args(tiny_data, tmp_path, "full", *args, *CCROP))
    assert plain.returncode == 0 and full.returncode == 0, full.stderr[-3000:]
    assert "ContrastiveCrop boxes updated before epoch 1" in full.stderr
    ref, base = losses(tmp_path / "full"), losses(tmp_path / "plain")
    assert all(ref[s] == pytest.approx(base[s], rel=1e-6) for s in range(1, 6))  # warm-up: plain crops
    assert all(ref[s] != pytest.approx(base[s], rel=1e-6) for s in range(6, 10))  # the boxes' crops
    cut = [*args[:2], "run.max_steps=7", args[3]]
    assert run_train(*tiny_args(tiny_data, tmp_path, "cut", *cut, "run.checkpoint_every=7", *CCROP)).returncode == 0
    second = run_train(*tiny_args(tiny_data, tmp_path, "cut", *args, *CCROP))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    assert "ContrastiveCrop boxes updated" not in second.stderr  # restored, not recomputed mid-epoch
    got = losses(tmp_path / "cut")
    for step in (8, 9):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step


def test_contrastive_crop_needs_enabled_and_vit_size(tiny_data, tmp_path):
    res = run_train(*tiny_args(tiny_data, tmp_path, "bad", "ccrop.alpha=0.1"))
    assert res.returncode == 2 and "ccrop.alpha" in res.stderr
    res = run_train(*cmae_args(tiny_data, tmp_path, "bad2", "ccrop.enabled=true", "ccrop.size=64"))
    assert res.returncode == 2 and "ccrop.size" in res.stderr


@pytest.mark.parametrize("backend,module", [pytest.param("dali", "nvidia.dali", marks=pytest.mark.dali),
                                            pytest.param("ffcv", "ffcv", marks=pytest.mark.ffcv)])
def test_cmae_with_contrastive_crop_trains_on_backend(tiny_data, tmp_path, backend, module):
    pytest.importorskip(module, reason=f"{module} not installed (pip install '.[{backend}]')")
    root = tmp_path / "data"  # a private copy: the ffcv backend writes its .beton beside the images
    shutil.copytree(tiny_data, root)
    res = run_train(*cmae_args(root, tmp_path, "run", f"data.backend={backend}", "data.workers=1", *CCROP,
                               "run.max_steps=7"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ContrastiveCrop boxes updated before epoch 1" in res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["config"]["data"]["backend"] == backend
