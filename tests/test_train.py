"""train.py end to end in subprocesses: smoke run, checkpoint round-trip, exact resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainrun import TINY, read_metrics, run_train


def tiny_args(tiny_data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"data.root={tiny_data}", f"run.out_dir={out}", f"run.name={name}", *extra]


def test_smoke_three_steps_and_checkpoint_round_trip(tiny_data, tmp_path):
    res = run_train(*tiny_args(tiny_data, tmp_path, "smoke", "run.max_steps=3"))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("epochs", "steps", "images_per_sec", "knn_top1", "knn_top1_init", "wall_seconds", "config"):
        assert key in summary
    assert summary["steps"] == 3 and summary["images_per_sec"] > 0
    assert 0 <= summary["knn_top1"] <= 100 and summary["config"]["model"]["arch"] == "resnet10"
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 3 and all(l > 0 for l in losses)
    ckpt = run / (run / "latest").read_text().strip()
    assert ckpt.name == "checkpoint-00000003"
    state = load_file(str(ckpt / "model.safetensors"))
    assert state["queue"].shape == (128, 64)
    # the stored weights build the same model again (the eval commands rely on it)
    from mixmask.frameworks.moco_v2 import MoCoV2, MoCoV2Config

    model = MoCoV2(MoCoV2Config(dim=128, mlp_hidden=64, queue=64), arch="resnet10")
    model.load_state_dict(state)
    assert torch.equal(model.queue, state["queue"])
    assert not any(p.name.startswith(".tmp") for p in run.iterdir())
    # the knn command reads the checkpoint back
    res = run_train("knn", *tiny_args(tiny_data, tmp_path, "smoke"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ckpt / "knn.json").read_text())["knn_top1"] == pytest.approx(summary["knn_top1"], abs=1e-6)


def test_resume_continues_exactly(tiny_data, tmp_path):
    """Stopped after 2 steps and resumed, a run's next losses equal the uninterrupted run's."""
    full = run_train(*tiny_args(tiny_data, tmp_path, "full", "run.max_steps=7"))
    assert full.returncode == 0, full.stderr[-3000:]
    first = run_train(*tiny_args(tiny_data, tmp_path, "cut", "run.max_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(*tiny_args(tiny_data, tmp_path, "cut", "run.max_steps=7"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    ref = {m["step"]: m for m in read_metrics(tmp_path / "full") if "loss" in m}
    got = {m["step"]: m for m in read_metrics(tmp_path / "cut") if "loss" in m}
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7]
    for step in (3, 4, 5, 6, 7):  # across the epoch boundary (5 batches of 16 per epoch)
        assert got[step]["lr"] == ref[step]["lr"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-5)
    a = load_file(str(tmp_path / "full" / "checkpoint-00000007" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint-00000007" / "model.safetensors"))
    assert torch.equal(a["queue_ptr"], b["queue_ptr"])
    assert torch.allclose(a["queue"], b["queue"], atol=1e-5)


@pytest.mark.parametrize("backend,module", [pytest.param("dali", "nvidia.dali", marks=pytest.mark.dali),
                                            pytest.param("ffcv", "ffcv", marks=pytest.mark.ffcv)])
def test_backend_trains_and_resumes_exactly(tiny_data, tmp_path, backend, module):
    """data.backend=dali|ffcv end to end: the same summary, and a cut + resumed run equals the full run."""
    pytest.importorskip(module, reason=f"{module} not installed (pip install '.[{backend}]')")
    root = tmp_path / "data"  # a private copy: the ffcv backend writes its .beton beside the images
    shutil.copytree(tiny_data, root)
    tiny_data = root
    dali = (f"data.backend={backend}", "data.workers=1")
    full = run_train(*tiny_args(tiny_data, tmp_path, "full", *dali, "run.max_steps=7"))
    assert full.returncode == 0, full.stderr[-3000:]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["config"]["data"]["backend"] == backend and summary["steps"] == 7
    assert summary["images_per_sec"] > 0 and 0 <= summary["knn_top1"] <= 100
    assert run_train(*tiny_args(tiny_data, tmp_path, "cut", *dali, "run.max_steps=2")).returncode == 0
    second = run_train(*tiny_args(tiny_data, tmp_path, "cut", *dali, "run.max_steps=7"))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    ref = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "full") if "loss" in m}
    got = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "cut") if "loss" in m}
    for step in (3, 4, 5, 6, 7):  # across the epoch boundary
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5)


@pytest.mark.ffcv
def test_write_beton_command(tiny_data, tmp_path):
    pytest.importorskip("ffcv")
    args = ["write-beton", f"data.root={tiny_data}", f"data.beton_dir={tmp_path / 'b'}", "run.progress=false"]
    res = run_train(*args, "data.ffcv_write_mode=raw")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train.beton: 80 images, 10 classes" in res.stdout and "val.beton: 40 images" in res.stdout
    again = run_train(*args)
    assert again.returncode == 2 and "exists" in again.stderr  # refuses to overwrite
    assert run_train(*args, "--overwrite").returncode == 0


def test_check_command_lists_undecodable_files(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    bad = next((root / "val").iterdir()) / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    backends = ["torchvision"]
    try:
        import nvidia.dali  # noqa: F401
        backends.append("dali")
    except ImportError:
        pass
    for backend in backends:
        res = run_train("check", f"data.root={root}", f"data.backend={backend}", "run.progress=false")
        assert res.returncode == 1, res.stderr[-2000:]
        lines = res.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(str(bad)), res.stdout
        assert f"1 of 121 images cannot be decoded by the {backend} backend" in res.stderr
    res = run_train("check", f"data.root={tiny_data}", "run.progress=false")
    assert res.returncode == 0 and res.stdout.strip() == ""


def test_linear_probe_command(tiny_data, tmp_path):
    res = run_train(*tiny_args(tiny_data, tmp_path, "lp", "run.max_steps=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_train("linear", *tiny_args(tiny_data, tmp_path, "lp", "eval.epochs=3", "eval.augment=false", "eval.lr=1.0"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "lp" / "checkpoint-00000001" / "linear.json").read_text())
    assert 0 <= out["top1"] <= 100 and out["epochs"] == 3
    assert "linear: top-1" in res.stdout


def one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[0]


def test_missing_data_path(tmp_path):
    msg = one_line_error(run_train(f"data.root={tmp_path / 'nope'}", f"run.out_dir={tmp_path}"))
    assert "data root not found" in msg and "nope" in msg


def test_empty_class_folder(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    for f in (root / "train" / "circle").iterdir():
        f.unlink()
    msg = one_line_error(run_train(*tiny_args(root, tmp_path, "e")))
    assert "empty class folder" in msg and "circle" in msg


def test_unknown_config_key(tmp_path):
    msg = one_line_error(run_train("optim.lrr=0.1", f"run.out_dir={tmp_path}"))
    assert "optim.lrr" in msg


def test_corrupt_image_is_skipped_and_counted(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    victims = sorted((root / "train" / "square").iterdir())[:2]
    victims[0].write_bytes(b"definitely not a jpeg")
    victims[1].write_bytes(victims[1].read_bytes()[:200])  # truncated
    res = run_train(*tiny_args(root, tmp_path, "bad", "optim.epochs=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert victims[0].name in res.stderr and "skipped unreadable image" in res.stderr
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["bad_files"] == 2


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from trainrun import REPO

    args = tiny_args(tiny_data, tmp_path, "sig", "optim.epochs=50", "run.checkpoint_every=0")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted at step" in err
    last = max(m["step"] for m in read_metrics(tmp_path / "sig") if "loss" in m)
    assert (tmp_path / "sig" / "latest").read_text().strip() == f"checkpoint-{last:08d}"
    res = run_train(*args, f"run.max_steps={last + 2}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {tmp_path / 'sig' / f'checkpoint-{last:08d}'}" in res.stderr
    assert json.loads((tmp_path / "sig" / "summary.json").read_text())["steps"] == last + 2
