"""The engine against a stub framework: once-per-step EMA hook, lr groups, no per-step sync, NaN stop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mixmask.batch import Batch
from mixmask.engine import Meter, TrainState, fit, set_lr


class Stub(nn.Module):
    """A linear 'framework': loss = mean((w x1)^2); records after_step calls and the batches seen."""

    def __init__(self, nan_at: int = 0):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls, self.after, self.nan_at = 0, [], nan_at

    def forward(self, b: Batch) -> dict[str, torch.Tensor]:
        self.calls += 1
        loss = self.lin(b.x1).pow(2).mean()
        if self.nan_at and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "part": loss.detach() * 2}

    def after_step(self, step: int, total_steps: int) -> None:
        self.after.append((step, total_steps))


class ListLoader:
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.batches = [Batch(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g),
                              torch.zeros(3, dtype=torch.long)) for _ in range(n)]

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.start = start_batch

    def __iter__(self):
        return iter(self.batches[self.start:])


def run_fit(tmp_path, model, n_batches=4, epochs=2, **kw):
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    state = TrainState()
    acc.register_for_checkpointing(state)
    facts = fit(acc, model, opt, ListLoader(n_batches), state, run_dir=tmp_path, config={}, epochs=epochs,
                base_lr=0.1, progress=False, **kw)
    return facts, state, acc.unwrap_model(model)


def test_after_step_runs_once_per_optimizer_step_with_grad_accum(tmp_path):
    facts, state, net = run_fit(tmp_path, Stub(), n_batches=4, epochs=2, grad_accum=2, log_every=1)
    assert facts["steps"] == state.step == 4  # 2 steps of 2 micro-batches per epoch
    assert net.calls == 8  # every micro-batch went forward
    assert net.after == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the EMA hook: once per optimizer step, not per micro-batch


def test_logged_values_are_window_means(tmp_path):
    run_fit(tmp_path, Stub(), n_batches=6, epochs=1, log_every=3)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 6]  # the first three steps, then every log_every
    for r in rows:
        if "loss" in r:
            assert r["part"] == pytest.approx(2 * r["loss"], rel=1e-6)  # parts averaged like the loss


def test_non_finite_loss_stops_with_the_step_range(tmp_path):
    with pytest.raises(FloatingPointError, match=r"at a step in 4\.\.5"):
        run_fit(tmp_path, Stub(nan_at=5), n_batches=8, epochs=1, log_every=5)


def test_meter_reads_the_device_only_when_asked(monkeypatch):
    """add() never converts to a Python number: the steady-state step does not wait for the device."""
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in the steady-state path"))
    m = Meter(0, warm=0)
    for i in range(5):
        m.add({"loss": torch.tensor(float(i))}, 8)
    assert calls == []
    assert m.read(5)["loss"] == pytest.approx(2.0) and calls == [1]


def test_set_lr_honours_scales_and_fixed_groups():
    w = [nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [w[0]]}, {"params": [w[1]], "lr_scale": 0.024},
                           {"params": [w[2]], "fixed_lr": True}], lr=1.0)
    set_lr(opt, 0.5, base_lr=2.0)
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.012), 2.0]


def test_engine_imports_no_framework_mixer_or_loader():
    code = ("import sys, mixmask.engine; bad = [m for m in sys.modules if m.startswith(('mixmask.frameworks', "
            "'mixmask.mixing', 'mixmask.losses', 'loaders'))]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_loaders_import_no_accelerate():
    code = ("import sys, loaders.torchvision_backend, mixmask.mixing.stage, loaders.demo, loaders.sharding; "
            "assert 'accelerate' not in sys.modules and 'mixmask.engine' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
