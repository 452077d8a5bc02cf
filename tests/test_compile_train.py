"""train.py with model.compile (aot_eager: fast) and model.batch_views: checkpoints load into uncompiled
models and runs resume across the settings (tests/mixmask/test_compile.py: the compiled numerics)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from trainrun import TINY, read_metrics, run_train


def test_train_compiled_checkpoint_loads_uncompiled_and_resumes(tiny_data, tmp_path):
    """train.py with model.compile on (aot_eager) writes a checkpoint an uncompiled model loads strictly; the
    run resumes from it uncompiled with model.batch_views on (one CPU train step with it)."""
    args = [*TINY, f"data.root={tiny_data}", f"run.out_dir={tmp_path}", "run.name=c", "run.knn_every=0"]
    first = run_train(*args, "run.max_steps=2", "model.compile=default", "model.compile_backend=aot_eager")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "torch.compile (default, aot_eager, dynamic=False): encoder_q, encoder_k" in first.stderr
    run = tmp_path / "c"
    ckpt = run / (run / "latest").read_text().strip()
    from mixmask.frameworks.moco_v2 import MoCoV2, MoCoV2Config

    model = MoCoV2(MoCoV2Config(dim=128, mlp_hidden=64, queue=64), arch="resnet10")
    missing, unexpected = model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    assert not missing and not unexpected
    second = run_train(*args, "run.max_steps=3", "model.batch_views=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    losses = {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert json.loads((run / "summary.json").read_text())["config"]["model"]["batch_views"] is True
