"""Fault injection: SIGKILL at random instants (mid-step, inside a checkpoint write, between the rename and
``latest``, from outside at a random step), a full disk during a checkpoint write, a non-finite loss.

Every case reruns the same command afterwards and checks that it resumes from the last complete checkpoint
(``resumed from ...``), that nothing half-written is used or left behind, and that every logged loss (before
the fault and after the resume) equals the uninterrupted run's (rel 1e-5). The kill points come from a seeded
generator (MIXMASK_FAULT_SEED, default below): "random" but reproducible; another seed explores other points.
The faults inside train.py come from the MIXMASK_FAULT hook (mixmask/faults.py); the external kill is a real
SIGKILL sent by this process. Bounded: the TINY config, 7 steps (5 per epoch), a checkpoint every 2 steps.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainrun import REPO, TINY, read_metrics

SEED = int(os.environ.get("MIXMASK_FAULT_SEED", "1202"))
STEPS, EVERY, PER_EPOCH = 7, 2, 5  # 80 images / batch 16 = 5 steps per epoch


def checkpoint_steps(steps: int, every: int, per_epoch: int) -> list[int]:
    """The steps fit writes a checkpoint at: every ``every`` steps, each epoch end, the last step."""
    return [s for s in range(1, steps + 1) if (every and s % every == 0) or s % per_epoch == 0 or s == steps]


CKPTS = checkpoint_steps(STEPS, EVERY, PER_EPOCH)  # [2, 4, 5, 6, 7]
_rng = random.Random(SEED)
KILLS = [
    ("kill_at_step", _rng.randint(2, STEPS)),  # mid-step: after the optimizer step, before its log / checkpoint
    ("kill_in_checkpoint", _rng.choice(CKPTS)),  # temp folder half-written, before the rename
    ("kill_before_latest", _rng.choice(CKPTS[:-1])),  # renamed, `latest` still names the previous one
    ("sigkill", _rng.randint(2, STEPS - 2)),  # from outside, once the step is in metrics.jsonl
]
ENOSPC_AT = _rng.choice(CKPTS[1:-1])  # a checkpoint with one before it
NAN_AT = _rng.choice([4, 5, 6])  # steps 1-3 are always logged: a NaN at 4..6 falls between log steps


def args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"data.root={data}", f"run.out_dir={out}", f"run.name={name}", f"run.max_steps={STEPS}",
            f"run.checkpoint_every={EVERY}", *extra]


def env(fault: str = "") -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    e.pop("MIXMASK_FAULT", None)
    return {**e, "MIXMASK_FAULT": fault} if fault else e


def train(argv: list[str], fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env(fault),
                          capture_output=True, text=True, timeout=600)


def losses(rows: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]


def metrics(run: Path) -> list[dict]:
    return read_metrics(run) if (run / "metrics.jsonl").is_file() else []


def assert_matches(got: list[tuple[int, float, float]], ref: dict[int, tuple[float, float]]) -> None:
    for step, loss, lr in got:
        assert lr == ref[step][1], (step, lr, ref[step][1])
        assert loss == pytest.approx(ref[step][0], rel=1e-5, abs=1e-6), (step, loss, ref[step][0])


def step_of(ckpt: Path | None) -> int:
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def temp_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".tmp"))


def rerun_resumes_exactly(argv: list[str], run: Path, expected: Path | None, ref: dict, steps: int = STEPS) -> None:
    """Rerun the same command: it resumes from ``expected`` (None: starts afresh), logs every following step
    with the uninterrupted run's loss and lr, and leaves no temporary folder."""
    before = metrics(run)
    res = train(argv)
    assert res.returncode == 0, res.stderr[-3000:]
    if expected is None:
        assert "resumed from" not in res.stderr
    else:
        assert f"resumed from {expected} at" in res.stderr, res.stderr[-3000:]
    new = losses(metrics(run)[len(before):])
    assert [s for s, _, _ in new] == list(range(step_of(expected) + 1, steps + 1))
    assert_matches(losses(before) + new, ref)  # before the fault too: the fault changed nothing before it
    assert temp_dirs(run) == []
    assert (run / "latest").read_text().strip() == f"checkpoint-{steps:08d}"


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict[int, tuple[float, float]]:
    """The uninterrupted run: step -> (loss, lr)."""
    out = tmp_path_factory.mktemp("faults_ref")
    res = train(args(tiny_data, out, "ref"))
    assert res.returncode == 0, res.stderr[-3000:]
    ref = {s: (loss, lr) for s, loss, lr in losses(read_metrics(out / "ref"))}
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


def kill_from_outside(argv: list[str], run: Path, after_step: int) -> int:
    """Start train.py, SIGKILL it once ``after_step`` is in metrics.jsonl (wherever it then is)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(r.get("step", 0) >= after_step and "loss" in r for r in metrics(run)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


@pytest.mark.parametrize("kind,step", KILLS, ids=[f"{k}={s}" for k, s in KILLS])
def test_sigkill_then_the_same_command_resumes_exactly(tiny_data, tmp_path, reference, kind, step):
    from mixmask.checkpoint import is_complete, latest_checkpoint

    run, argv = tmp_path / "k", args(tiny_data, tmp_path, "k")
    if kind == "sigkill":
        code = kill_from_outside(argv, run, step)
    else:
        res = train(argv, fault=f"{kind}={step}")
        code = res.returncode
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert code == -signal.SIGKILL, code
    before = [c for c in CKPTS if c < step]
    if kind == "kill_in_checkpoint":  # the kill left a half-written temporary folder and no checkpoint-<step>
        assert (run / f".tmp-checkpoint-{step:08d}" / "model.safetensors").is_file()
        assert not (run / f".tmp-checkpoint-{step:08d}" / "manifest.json").exists()
        assert not (run / f"checkpoint-{step:08d}").exists()
    if kind == "kill_before_latest":  # renamed and complete, but `latest` names the one before (or is absent)
        assert is_complete(run / f"checkpoint-{step:08d}")
        marker = run / "latest"
        assert (marker.read_text().strip() if marker.is_file() else None) == \
            (f"checkpoint-{before[-1]:08d}" if before else None)
    expected = {"kill_at_step": before[-1] if before else None, "kill_in_checkpoint": before[-1] if before else None,
                "kill_before_latest": step}.get(kind)
    found = latest_checkpoint(run)
    if kind == "sigkill":  # wherever it landed: the newest complete checkpoint
        done = [p for p in run.glob("checkpoint-*") if is_complete(p)]
        expected = max((step_of(p) for p in done), default=None)
        assert (expected or 0) >= max((c for c in CKPTS if c < step), default=0)  # its own may be in flight
    assert found == (run / f"checkpoint-{expected:08d}" if expected else None)
    rerun_resumes_exactly(argv, run, found, reference)


def test_full_disk_during_a_checkpoint_write(tiny_data, tmp_path, reference):
    """ENOSPC while checkpoint-N is written: one error line naming the file, the space needed and free; exit 2;
    the temporary folder removed; the previous checkpoint is the latest and the rerun resumes from it."""
    run, argv = tmp_path / "full", args(tiny_data, tmp_path, "full")
    res = train(argv, fault=f"enospc_in_checkpoint={ENOSPC_AT}")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    previous = run / f"checkpoint-{max(c for c in CKPTS if c < ENOSPC_AT):08d}"
    msg = errors[0]
    assert "no space left" in msg and str(run / f".tmp-checkpoint-{ENOSPC_AT:08d}" / "optimizer.safetensors") in msg
    need = float(re.search(r"needs about ([\d.]+) MB", msg).group(1))
    size = sum(f.stat().st_size for f in previous.iterdir()) / 1e6
    assert need == pytest.approx(size, abs=0.1)  # the previous checkpoint's size
    free = float(re.search(r"([\d.]+) MB are free", msg).group(1))
    assert free == pytest.approx(shutil.disk_usage(run).free / 1e6, rel=0.05)
    assert previous.name in msg
    assert temp_dirs(run) == [] and not (run / f"checkpoint-{ENOSPC_AT:08d}").exists()
    assert (run / "latest").read_text().strip() == previous.name
    rerun_resumes_exactly(argv, run, previous, reference)


def test_non_finite_loss_stops_and_the_last_checkpoint_is_good(tiny_data, tmp_path, reference):
    """A NaN loss (and weights) at a step between log steps, a checkpoint right after it: the run stops with one
    error line (exit 2) before writing it; the last checkpoint holds finite weights and the rerun resumes."""
    run = tmp_path / "nan"
    argv = args(tiny_data, tmp_path, "nan", "run.log_every=100")
    res = train(argv, fault=f"nan_at_step={NAN_AT}")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"loss is nan at a step in 4..{NAN_AT}" in errors[0]
    good = run / f"checkpoint-{max(c for c in CKPTS if c < NAN_AT):08d}"
    assert not (run / f"checkpoint-{NAN_AT:08d}").exists() and temp_dirs(run) == []
    from mixmask.checkpoint import latest_checkpoint

    assert latest_checkpoint(run) == good and (run / "latest").read_text().strip() == good.name
    for f in ("model.safetensors", "optimizer.safetensors"):
        for k, t in load_file(str(good / f)).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), (f, k)
    rerun_resumes_exactly(args(tiny_data, tmp_path, "nan"), run, good, reference)


# ---- in-process: latest_checkpoint and save_checkpoint on a tiny model (no subprocess) ----------------------


@pytest.fixture
def saver(tmp_path):
    """save(step) -> checkpoint-<step> of a tiny model in tmp_path/run (keep 10)."""
    from accelerate import Accelerator

    from mixmask.checkpoint import save_checkpoint
    from mixmask.engine import TrainState

    acc = Accelerator(cpu=True)
    net = torch.nn.Linear(4, 3)
    model, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    state = TrainState()

    def save(step: int, keep: int = 10) -> Path:
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        state.step = step
        return save_checkpoint(acc, tmp_path / "run", step, {"c": 1}, keep, model=model, optimizer=opt,
                               states={"train": state})

    save.acc, save.model, save.opt, save.run = acc, model, opt, tmp_path / "run"
    return save


def test_latest_checkpoint_after_crashes(saver):
    from mixmask.checkpoint import MANIFEST, is_complete, latest_checkpoint

    run = saver.run
    c2, c4, c6 = saver(2), saver(4), saver(6)
    assert latest_checkpoint(run) == c6 and is_complete(c6)
    # renamed but `latest` not rewritten (a crash in between): the complete successor of the named one wins
    (run / "latest").write_text(c4.name + "\n")
    assert latest_checkpoint(run) == c6
    (run / "latest").write_text(c2.name + "\n")  # two in a row: 2 -> 4 -> 6
    assert latest_checkpoint(run) == c6
    # a complete checkpoint that does not descend from the named one (e.g. an earlier run's) is not taken
    (run / "latest").write_text(c4.name + "\n")
    stray = run / "checkpoint-00000099"
    shutil.copytree(c2, stray)
    assert latest_checkpoint(run) == c6
    shutil.rmtree(stray)
    # a successor with a file missing or truncated is incomplete: never returned
    (c6 / "optimizer.json").write_text((c6 / "optimizer.json").read_text()[:-3])
    assert not is_complete(c6) and latest_checkpoint(run) == c4
    shutil.rmtree(c6)
    # a stale `latest` naming a deleted folder: the complete checkpoint written last
    (run / "latest").write_text("checkpoint-00000006\n")
    assert latest_checkpoint(run) == c4
    (run / "latest").unlink()
    assert latest_checkpoint(run) == c4
    # an incomplete one named by `latest` (its manifest lists a file that is gone): the last complete one
    (c4 / "rng_0.json").unlink()
    (run / "latest").write_text(c4.name + "\n")
    assert latest_checkpoint(run) == c2
    # a leftover temporary folder is never returned, and the next save removes it
    shutil.copytree(c2, run / ".tmp-checkpoint-00000008")
    (run / ".tmp-checkpoint-00000008" / MANIFEST).unlink()
    assert latest_checkpoint(run) == c2
    c8 = saver(8)
    assert latest_checkpoint(run) == c8 and not list(run.glob(".tmp*"))
    # pruning renames before deleting: no partial checkpoint-* folder, no leftover
    saver(10, keep=2)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "."))) == \
        ["checkpoint-00000008", "checkpoint-00000010"]


def test_a_full_disk_in_safetensors_is_one_error_and_keeps_the_previous(saver, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... No space left on device (os error 28)"), not
    OSError: the same one-line CheckpointWriteError, the temporary folder removed, the previous one loadable."""
    import accelerate.utils
    from safetensors import SafetensorError

    from mixmask.checkpoint import CheckpointWriteError, latest_checkpoint, load_checkpoint
    from mixmask.engine import TrainState

    c2 = saver(2)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(accelerate.utils, "save", full)
    with pytest.raises(CheckpointWriteError, match=r"^no space left .*model\.safetensors: a checkpoint needs") as e:
        saver(4)
    assert "\n" not in str(e.value) and c2.name in str(e.value)
    assert latest_checkpoint(saver.run) == c2 and not list(saver.run.glob(".tmp*"))
    state = TrainState()
    load_checkpoint(saver.acc, c2, saver.model, saver.opt, {"train": state})
    assert state.step == 2


def test_non_finite_weights_are_never_written(saver):
    """Even with a finite loss (e.g. a gradient overflow): save_checkpoint refuses NaN weights, writes nothing."""
    from mixmask.checkpoint import latest_checkpoint

    c2 = saver(2)
    with torch.no_grad():
        saver.model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"checkpoint-00000004 not written: non-finite weights \(weight\)"):
        saver(4)
    assert latest_checkpoint(saver.run) == c2 and not list(saver.run.glob(".tmp*"))
    assert not (saver.run / "checkpoint-00000004").exists()


def test_an_unknown_fault_is_an_error(monkeypatch):
    from mixmask import faults

    monkeypatch.setenv("MIXMASK_FAULT", "kill_at_stp=3")
    with pytest.raises(ValueError, match="kill_at_stp"):
        faults.due("kill_at_step", 3)
    monkeypatch.delenv("MIXMASK_FAULT")
    assert not faults.due("kill_at_step", 3)


# ---- DALI and FFCV --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,module", [pytest.param("dali", "nvidia.dali", marks=pytest.mark.dali),
                                            pytest.param("ffcv", "ffcv", marks=pytest.mark.ffcv)])
def test_backend_sigkill_in_a_checkpoint_resumes_exactly(tiny_data, tmp_path, request, backend, module):
    """data.backend=dali|ffcv: SIGKILL inside the last checkpoint's write (every step already logged: the killed
    run is the uninterrupted reference); the rerun resumes from the checkpoint before and repeats its losses."""
    pytest.importorskip(module, reason=f"{module} not installed (pip install '.[{backend}]')")
    data = [f"data.backend={backend}", "data.workers=1"]
    if backend == "ffcv":  # the session's .beton files of tiny_data (read only)
        data.append(f"data.beton_dir={request.getfixturevalue('tiny_betons')}")
    steps, every = 8, 4
    ckpts = checkpoint_steps(steps, every, PER_EPOCH)  # [4, 5, 8]
    run = tmp_path / "k"
    argv = [*args(tiny_data, tmp_path, "k", *data), f"run.max_steps={steps}", f"run.checkpoint_every={every}"]
    res = train(argv, fault=f"kill_in_checkpoint={steps}")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    ref = {s: (loss, lr) for s, loss, lr in losses(read_metrics(run))}
    assert sorted(ref) == list(range(1, steps + 1))
    assert (run / f".tmp-checkpoint-{steps:08d}").is_dir()
    rerun_resumes_exactly(argv, run, run / f"checkpoint-{ckpts[-2]:08d}", ref, steps)
