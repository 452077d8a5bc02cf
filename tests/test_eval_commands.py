"""The evaluation commands end to end on a tiny pretrained checkpoint: finetune, semisup (resumable, its
subset written and reused), export, show-batch, report, and their one-line errors (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainrun import TINY, run_train


def tiny_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"data.root={data}", f"run.out_dir={out}", f"run.name={name}", *extra]


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run dir) of a 3-step MoCo v2 + MixMask pretraining on the tiny demo set."""
    out = tmp_path_factory.mktemp("pre")
    res = run_train(*tiny_args(tiny_data, out, "pre", "run.max_steps=3", "run.show_every=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    return tiny_data, out / "pre"


FT = ["finetune.epochs=2", "finetune.batch_size=8", "finetune.crop_scale=[0.5,1.0]"]


def test_finetune_writes_its_result_beside_the_checkpoint(pretrained, tmp_path):
    data, run = pretrained
    res = run_train("finetune", *tiny_args(data, run.parent, "pre", *FT))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = run / (run / "latest").read_text().strip()
    result = json.loads((ckpt / "finetune.json").read_text())
    assert result["kind"] == "finetune" and result["labelled_images"] == 80 and result["epochs"] == 2
    assert 0 <= result["top1"] <= 100 and result["steps"] == 2 * (80 // 8)
    summary = json.loads((run / "finetune" / "summary.json").read_text())
    assert summary["config"]["model"]["arch"] == "resnet10"  # read from the checkpoint
    assert (run / "finetune" / "latest").is_file()


def test_semisup_subset_is_written_reused_and_resumes(pretrained):
    data, run = pretrained
    args = tiny_args(data, run.parent, "pre", *FT, "finetune.fraction=0.25")
    first = run_train("semisup", *args, "run.max_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    subset = json.loads((run / "semisup_25" / "subset.json").read_text())
    assert subset["images"] == 20 and subset["fraction"] == 0.25  # 2 of the 8 images of each of 10 classes
    second = run_train("semisup", *args)
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    assert json.loads((run / "semisup_25" / "subset.json").read_text()) == subset
    ckpt = run / (run / "latest").read_text().strip()
    result = json.loads((ckpt / "semisup_25.json").read_text())
    assert result["labelled_images"] == 20 and result["steps"] == 2 * (20 // 8)


@pytest.mark.parametrize("extra,message", [
    (["finetune.fraction=0.05"], "without a labelled image"),  # 8 images a class: 0.4 rounds to 0
    (["finetune.fraction=0.25", "finetune.batch_size=64"], "cannot fill one batch"),
])
def test_semisup_bad_fraction_is_a_one_line_error(pretrained, extra, message):
    data, run = pretrained
    res = run_train("semisup", *tiny_args(data, run.parent, "pre", *extra))
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_missing_checkpoint_and_other_architecture(pretrained, tmp_path):
    data, run = pretrained
    res = run_train("finetune", *tiny_args(data, tmp_path, "nothing-here", *FT))
    assert res.returncode == 2 and "no checkpoint found" in res.stderr.strip().splitlines()[-1]
    ckpt = run / (run / "latest").read_text().strip()
    bare = tmp_path / "bare.safetensors"  # the weights without their config.json: the config's arch is used
    shutil.copy(ckpt / "model.safetensors", bare)
    res = run_train("linear", *tiny_args(data, tmp_path, "x", "model.arch=resnet18", f"eval.checkpoint={bare}"))
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "does not fit" in last and "model.arch=resnet18" in last


def test_export_command_writes_loadable_files(pretrained, tmp_path):
    data, run = pretrained
    res = run_train("export", "--out", str(tmp_path / "exp"), *tiny_args(data, run.parent, "pre"))
    assert res.returncode == 0, res.stderr[-3000:]
    facts = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert facts["arch"] == "resnet10" and facts["framework"] == "moco_v2"
    for name in ("backbone_torchvision.safetensors", "backbone_timm.safetensors", "backbone_detectron2.pkl",
                 "backbone_detectron2.safetensors"):
        assert (tmp_path / "exp" / name).is_file() and name in res.stdout
    assert "fc.weight" in res.stdout  # the keys the torchvision model has and the file lacks are named


def test_show_batch_and_report_commands(pretrained, tmp_path):
    from PIL import Image

    data, run = pretrained
    res = run_train("show-batch", "--out", str(tmp_path / "b.png"), "--samples", "3", *tiny_args(data, tmp_path, "x"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert Image.open(tmp_path / "b.png").size[1] > 3 * 32  # three rows of tiles and a header
    res = run_train("report", str(run), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| pre |" in res.stdout and (tmp_path / "rep" / "report.md").is_file()
    res = run_train("report", str(tmp_path / "nothing"))
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("backend,module", [pytest.param("dali", "nvidia.dali", marks=pytest.mark.dali),
                                            pytest.param("ffcv", "ffcv", marks=pytest.mark.ffcv)])
def test_evaluations_read_through_the_backend(pretrained, tmp_path, backend, module):
    """knn, linear (augmented: the one-view training loader) and semisup on the DALI / FFCV loaders."""
    pytest.importorskip(module, reason=f"{module} not installed (pip install '.[{backend}]')")
    data, run = pretrained
    root = tmp_path / "data"  # a private copy: the ffcv backend writes its .beton files beside the images
    shutil.copytree(data, root)
    ckpt = run / (run / "latest").read_text().strip()
    weights = tmp_path / "ckpt"
    weights.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(ckpt / name, weights / name)
    common = [*tiny_args(root, tmp_path, "x", f"data.backend={backend}", "data.workers=1"), f"eval.checkpoint={weights}"]
    for command, extra in (("knn", []), ("linear", ["eval.epochs=2", "eval.batch_size=16"]),
                           ("semisup", [*FT, "finetune.fraction=0.25", "finetune.epochs=1"])):
        res = run_train(command, *common, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
    knn = json.loads((weights / "knn.json").read_text())
    assert knn["backend"] == backend and 0 <= knn["knn_top1"] <= 100
    assert json.loads((weights / "linear.json").read_text())["backend"] == backend
    semi = json.loads((weights / "semisup_25.json").read_text())
    assert semi["backend"] == backend and semi["labelled_images"] == 20


def test_tensorboard_gets_the_batch_grid(pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = pretrained
    events = EventAccumulator(str(next((run / "tb").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("batch")
    assert [i.step for i in images] == [2]  # run.show_every=2 over 3 steps
    assert images[0].width == 3 * (96 + 2) - 2  # three 96-px columns: x1, x2 and the mixed view


def test_random_init_baseline_is_the_pretraining_start(pretrained, tmp_path):
    """benchmarks.evaluations' baseline row: the untrained model it rebuilds gives the kNN the pretraining
    measured before its first step (same config, same seed), and the table has a row per backend."""
    from benchmarks.evaluations import markdown, random_init

    data, run = pretrained
    ckpt = run / (run / "latest").read_text().strip()
    init = random_init(tmp_path, ckpt)
    res = run_train("knn", *tiny_args(data, tmp_path, "x", f"eval.checkpoint={init}"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((init / "knn.json").read_text())["knn_top1"] == pytest.approx(summary["knn_top1_init"], abs=1e-6)
    rows = [{"backend": b, "eval": "knn", "top1": 10.0 + i} for i, b in enumerate(("torchvision", "dali"))]
    md = markdown(rows, ["knn", "linear"], {"date": "2026-12-02", "cores": 2, "cpu": "x", "gpu": "", "torch": "2"},
                  {"epochs": 1, "knn_top1_init": 1.0, "knn_top1": 2.0})
    assert "| torchvision | 10.0 | — | — |" in md and "| dali | 11.0 | — | — |" in md
