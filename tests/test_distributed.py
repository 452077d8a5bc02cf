"""Two CPU processes with gloo under `accelerate launch --cpu`: sharding exactness and DDP training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainrun import REPO, TINY, run_train

pytestmark = pytest.mark.dist
# The command of the README: accelerate's --cpu launcher plus train.py's fan-out to N processes.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_every_sample_once_per_epoch_across_ranks(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    res = subprocess.run([*torchrun, str(REPO / "tests" / "loaders" / "dist_epoch_indices.py"), str(tiny_data), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        a, b = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert len(a) == len(b) == 40  # 80 images, 2 ranks, batches of 8: equal counts
        assert not set(a) & set(b)  # disjoint
        assert sorted(a + b) == list(range(80))  # every sample exactly once
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # reshuffled per epoch
    assert ranks[0]["counts"] == ranks[1]["counts"]


def test_two_process_training(tiny_data, tmp_path):
    res = run_train(*TINY, f"data.root={tiny_data}", f"run.out_dir={tmp_path}", "run.name=ddp", "data.batch_size=8",
                    "run.max_steps=3", launcher=LAUNCH)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["derived"]["world_size"] == 2 and summary["derived"]["global_batch"] == 16
    assert summary["steps"] == 3 and summary["images_per_sec"] > 0


def test_two_process_evaluations(tiny_data, tmp_path):
    """knn on 2 processes equals knn on 1 (padded shards, gathered, repeats dropped); semisup trains on 2."""
    common = [*TINY, f"data.root={tiny_data}", f"run.out_dir={tmp_path}", "run.name=pre", "data.batch_size=8"]
    assert run_train(*common, "run.max_steps=2").returncode == 0
    ckpt = tmp_path / "pre" / (tmp_path / "pre" / "latest").read_text().strip()
    knn = {}
    for world, launcher in ((1, None), (2, LAUNCH)):
        res = run_train("knn", *common, "data.batch_size=12", launcher=launcher)  # 40 val images: a padded shard
        assert res.returncode == 0, res.stderr[-3000:]
        knn[world] = json.loads((ckpt / "knn.json").read_text())
    assert knn[2]["processes"] == 2 and knn[2]["knn_top1"] == pytest.approx(knn[1]["knn_top1"], abs=1e-6)
    res = run_train("semisup", *common, "finetune.fraction=0.5", "finetune.epochs=1", "finetune.batch_size=8",
                    launcher=LAUNCH)
    assert res.returncode == 0, res.stderr[-3000:]
    semi = json.loads((ckpt / "semisup_50.json").read_text())
    assert semi["processes"] == 2 and semi["labelled_images"] == 40 and semi["steps"] == 40 // 16


def test_two_machines_on_one_host_train_like_two_processes(tiny_data, tmp_path):
    """`accelerate launch --cpu --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1 ...` once per
    "node" (one process each) trains exactly as one node with 2 processes: same shards, same losses."""
    from trainrun import read_metrics

    common = [*TINY, f"data.root={tiny_data}", f"run.out_dir={tmp_path}", "data.batch_size=8", "run.max_steps=3"]
    one = run_train(*common, "run.name=one_node", launcher=LAUNCH)
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "2", "--machine_rank",
         str(r), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", "29547",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"), *common, "run.name=two_nodes"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "two_nodes" / "summary.json").read_text())
    assert summary["derived"]["world_size"] == 2 and summary["steps"] == 3
    losses = {name: [m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m] for name in ("one_node", "two_nodes")}
    assert losses["two_nodes"] == pytest.approx(losses["one_node"], rel=1e-6)
