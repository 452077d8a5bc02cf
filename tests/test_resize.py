"""Resuming on another number of processes (run.resize): 2 -> 1 and 1 -> 2 gloo CPU processes continue at
the same sample with the same global batch (keep_global_batch), or at the same sample with the new global
batch and a rescaled lr (rescale_lr); layouts that do not divide are one error line.

The samples behind every optimizer step are read from the engine's MIXMASK_LOG_INDICES=1 trace
(mixmask/indexlog.py) and compared with what an uninterrupted run trains on, computed from
loaders.sharding.shard_indices: step k of an epoch is the samples [k G, (k + 1) G) of its permutation."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from loaders.sharding import shard_indices
from mixmask.engine import cosine_lr
from test_distributed import LAUNCH
from trainrun import TINY, read_metrics, run_train

pytestmark = pytest.mark.dist
TWO = [*LAUNCH, "--main_process_port", "29563"]  # a port of its own: other distributed tests may run alongside
N = 80  # tiny_data's train images; data.batch_size=8 x 2 processes (or x grad_accum 2): 5 steps of 16 per epoch


@pytest.fixture(scope="module", autouse=True)
def log_indices():
    old = os.environ.get("MIXMASK_LOG_INDICES")
    os.environ["MIXMASK_LOG_INDICES"] = "1"
    yield
    if old is None:
        del os.environ["MIXMASK_LOG_INDICES"]
    else:
        os.environ["MIXMASK_LOG_INDICES"] = old


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={data}", f"run.out_dir={out}", "run.name=run", "data.batch_size=8", *extra]


@pytest.fixture(scope="module")
def two_procs_at_2(tiny_data, tmp_path_factory) -> Path:
    """A run directory of 2 processes x data.batch_size 8 stopped after 2 steps (run.max_steps=2)."""
    out = tmp_path_factory.mktemp("two")
    res = run_train(*args(tiny_data, out, "run.max_steps=2"), launcher=TWO)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path


def steps_seen(run: Path) -> dict[int, list[int]]:
    """step -> the dataset indices of its global batch (every process's trace together)."""
    seen: dict[int, list[int]] = {}
    for f in sorted(run.glob("indices_rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            seen.setdefault(rec["step"], []).extend(rec["index"])
    return seen


def expected(seed: int, epoch: int, first: int, size: int) -> set[int]:
    """The samples [first, first + size) of the epoch's permutation, as an uninterrupted 2-process run with
    data.batch_size=8 draws them (every rank's shard, loaders.sharding)."""
    per_rank = [shard_indices(N, r, 2, 8, seed, epoch, True, True) for r in range(2)]
    order = [int(per_rank[i % 2][i // 2]) for i in range(sum(map(len, per_rank)))]
    return set(order[first:first + size])


def check_samples(run: Path, steps: range, global_batch: int, steps_per_epoch: int) -> None:
    """Step s (1-based) of each of ``steps`` trained on the samples an uninterrupted run trains on: those of
    step k = (s - 1) mod steps_per_epoch of its epoch, [k G, (k + 1) G) of the epoch's permutation."""
    seed, seen = json.loads((run / "summary.json").read_text())["config"]["run"]["seed"], steps_seen(run)
    for s in steps:
        epoch, k = divmod(s - 1, steps_per_epoch)
        got = seen[s]
        assert len(got) == len(set(got)) == global_batch, (s, got)
        assert set(got) == expected(seed, epoch, k * global_batch, global_batch), f"step {s}"


def lrs(run: Path) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in read_metrics(run) if "lr" in m}


def state_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())["states"]["train"]


@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_keep_global_batch_continues_at_the_same_sample(tiny_data, tmp_path, two_procs_at_2, direction):
    """2 -> 1: grad_accum becomes 2; 1 -> 2 (1 process x grad_accum 2 first): grad_accum becomes 1. Either
    way the steps after the resume (across the epoch boundary) train on exactly the samples, and at the lr,
    of an uninterrupted 2-process run."""
    if direction == "2->1":
        out, accum, world = copy_run(two_procs_at_2, tmp_path), [], 1
    else:
        out, accum, world = tmp_path, ["optim.grad_accum=2"], 2
        res = run_train(*args(tiny_data, out, *accum, "run.max_steps=2"))
        assert res.returncode == 0, res.stderr[-3000:]
    res = run_train(*args(tiny_data, out, *accum, "run.max_steps=6"), launcher=TWO if world == 2 else None)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "run.resize=keep_global_batch" in res.stderr and "resumed from" in res.stderr
    run = out / "run"
    d = json.loads((run / "summary.json").read_text())["derived"]
    assert (d["world_size"], d["grad_accum"], d["global_batch"], d["steps_per_epoch"]) == \
        (world, 2 if world == 1 else 1, 16, 5)
    assert d["resized_from"]["world_size"] == 3 - world and d["resized_from"]["global_batch"] == 16
    check_samples(run, range(1, 7), 16, 5)  # steps 1-2 before, 3-6 after the resume; 6 is epoch 1's first
    got, total = lrs(run), 2 * 5  # optim.epochs=2
    for step in range(1, 7):  # the uninterrupted run's schedule (the same global batch, so the same lr)
        assert got[step] == pytest.approx(cosine_lr(step - 1, total, d["warmup_steps"], d["lr"]), rel=1e-12)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m and m["step"] > 2]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    ckpt = run / (run / "latest").read_text().strip()
    assert state_of(ckpt)["samples"] == 6 * 16 and state_of(ckpt)["epoch_samples"] == 16


def test_rescale_lr_keeps_the_sample_position(tiny_data, tmp_path, two_procs_at_2):
    """2 -> 1 with run.resize=rescale_lr: the global batch becomes 8, 32 samples into the epoch = step 4 of
    10; the lr is the formula's (optim.lr x 8 / 256, the schedule recomputed for 10 steps per epoch)."""
    out = copy_run(two_procs_at_2, tmp_path)
    before = json.loads((out / "run" / (out / "run" / "latest").read_text().strip() / "config.json").read_text())
    res = run_train(*args(tiny_data, out, "run.resize=rescale_lr", "run.max_steps=6"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "run.resize=rescale_lr" in res.stderr and "optimizer step 2 -> 4" in res.stderr
    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    d, cfg = summary["derived"], summary["config"]
    assert (d["world_size"], d["grad_accum"], d["global_batch"], d["steps_per_epoch"]) == (1, 1, 8, 10)
    assert d["lr"] == pytest.approx(cfg["optim"]["lr"] * 8 / 256) and d["lr"] == pytest.approx(before["derived"]["lr"] / 2)
    assert d["warmup_steps"] == round(cfg["optim"]["warmup_epochs"] * 10)
    got = lrs(run)
    assert sorted(got) == [1, 2, 5, 6]  # steps 3 and 4 do not exist: the new units put the resume at step 4
    assert got[5] == pytest.approx(cosine_lr(4, 2 * 10, d["warmup_steps"], d["lr"]), rel=1e-12)
    assert got[6] == pytest.approx(cosine_lr(5, 2 * 10, d["warmup_steps"], d["lr"]), rel=1e-12)
    seed, seen = cfg["run"]["seed"], steps_seen(run)
    check_samples(run, range(1, 3), 16, 5)  # before: 2 steps of 16
    assert set(seen[5]) == expected(seed, 0, 32, 8) and set(seen[6]) == expected(seed, 0, 40, 8)  # then samples 32-47
    ckpt = run / (run / "latest").read_text().strip()
    assert ckpt.name == "checkpoint-00000006"
    assert state_of(ckpt) | {"monitors": None} == {"epoch": 0, "step": 6, "step_in_epoch": 6, "samples": 48,
                                                   "epoch_samples": 48, "monitors": None}


@pytest.mark.parametrize("resize,batch,message", [
    ("keep_global_batch", 12, "error: run.resize=keep_global_batch: the checkpoint's global batch 16"),
    ("rescale_lr", 12, "error: run.resize=rescale_lr: the checkpoint is 32 samples into epoch 0"),
])
def test_a_layout_that_does_not_divide_is_one_error_line(tiny_data, tmp_path, two_procs_at_2, resize, batch, message):
    out = copy_run(two_procs_at_2, tmp_path)
    res = run_train(*args(tiny_data, out, f"run.resize={resize}", "run.max_steps=6"), f"data.batch_size={batch}")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), res.stderr[-3000:]
    assert "data.batch_size" in errors[0] and "Traceback" not in res.stderr
    assert not (out / "run" / "checkpoint-00000003").exists()


def test_resume_layout_plans(tmp_path):
    """resume_layout on written checkpoints, without training: 1 -> 2 with rescale_lr (fewer, larger steps),
    keep_global_batch on 4 processes, an older checkpoint without sample counts, an unchanged layout."""
    from train import resume_layout

    from mixmask.checkpoint import write_tree
    from mixmask.config import Config, ConfigError

    def ckpt(name: str, world: int, batch: int, accum: int, train: dict) -> Path:
        path = tmp_path / name
        path.mkdir()
        derived = {"world_size": world, "batch_size": batch, "grad_accum": accum, "global_batch": world * batch * accum}
        (path / "config.json").write_text(json.dumps({"config": {}, "derived": derived}))
        write_tree(path, "state", {"format": 1, "processes": world, "states": {"train": train}})
        return path

    cfg = Config()
    cfg.data.batch_size, cfg.run.resize = 8, "rescale_lr"
    one = ckpt("one", 1, 8, 1, {"epoch": 1, "step": 14, "step_in_epoch": 4, "samples": 112, "epoch_samples": 32})
    plan = resume_layout(cfg, 2, 10, one)  # 2 processes: 10 batches of 8 each per epoch of 160 images
    assert plan["grad_accum"] == 1 and plan["from"]["world_size"] == 1 and "optimizer step 14 -> 12" in plan["note"]
    assert plan["state"] == {"samples": 112, "epoch_samples": 32, "epoch": 1, "step_in_epoch": 2, "step": 12}
    with pytest.raises(ConfigError, match="32 samples into epoch 1, not a multiple of the new global batch 48.*"
                                          "dividing 16$"):
        cfg.optim.grad_accum = 3
        resume_layout(cfg, 2, 10, one)
    cfg.run.resize, cfg.optim.grad_accum = "keep_global_batch", 1
    with pytest.raises(ConfigError, match="global batch 8 .* is not data.batch_size 8 x 2 process.*divisor of 4 or"):
        resume_layout(cfg, 2, 10, one)
    cfg.data.batch_size = 4
    plan = resume_layout(cfg, 2, 20, ckpt("four", 4, 8, 1, {"epoch": 0, "step": 3, "step_in_epoch": 3}))
    assert plan["grad_accum"] == 4 and plan["state"] == {"samples": 96, "epoch_samples": 96}  # older: from the steps
    plan = resume_layout(cfg, 1, 20, ckpt("same", 1, 4, 1, {"epoch": 0, "step": 3, "step_in_epoch": 3}))
    assert plan["grad_accum"] == 1 and plan["from"] is None and plan["note"] is None
    plan = resume_layout(cfg, 1, 20, ckpt("adapted", 1, 4, 2, {"epoch": 0, "step": 3, "step_in_epoch": 3}))
    assert plan["grad_accum"] == 2 and plan["from"] is None and plan["note"] is None  # resized earlier: kept
