"""Checkpoints without pickle: the safetensors + JSON layout round-trips the whole training state (model,
optimizer, RNGs, TrainState, ContrastiveCrop's boxes), no written file is a pickle, loading never calls pickle,
and a pickle planted in a checkpoint is never run, by load_checkpoint or by train.py's resume."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mixmask.checkpoint import (CheckpointError, from_tree, latest_checkpoint, load_checkpoint, register_state,
                                save_checkpoint, to_tree)
from mixmask.crops import ContrastiveCrop, ContrastiveCropConfig
from mixmask.engine import TrainState

pytestmark = pytest.mark.usefixtures("one_thread")


class Extra:
    """A Stateful holding numpy arrays, numpy scalars, tuples and int-keyed dicts."""

    def __init__(self, seed: int):
        r = np.random.default_rng(seed)
        self.d = {"table": r.random((3, 2)).astype(np.float32), "ids": r.integers(0, 9, 4, dtype=np.int64),
                  "scale": np.float64(r.random()), "pair": (seed, "x"), "by_id": {seed: [1.5, None, True]}}

    def state_dict(self) -> dict:
        return self.d

    def load_state_dict(self, d: dict) -> None:
        self.d = d


class Evil:
    """Unpickling it creates ``marker`` (what a malicious checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(ckpt: Path, marker: Path) -> list[str]:
    """The files Accelerate's load_state reads with torch.load, each a pickle that creates ``marker``."""
    names = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
             "scheduler.bin", "scaler.pt", "sampler.bin", "pytorch_model.bin"]
    for name in names:
        torch.save(Evil(marker), ckpt / name)  # torch.save's zip archive around the pickle
    (ckpt / "model.pkl").write_bytes(pickle.dumps(Evil(marker)))  # and a bare pickle
    return names


def armed(tmp_path: Path) -> None:
    """The planted payload really runs when unpickled (so the tests below prove something)."""
    probe = tmp_path / "probe"
    torch.save(Evil(probe), tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert probe.is_file()
    probe.unlink()


def tiny(seed: int, opt: str):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    if opt == "sgd":
        groups = [{"params": model[0].parameters(), "lr_scale": 0.5},
                  {"params": list(model[1].parameters()) + list(model[3].parameters()), "fixed_lr": True}]
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    return model, optimizer


def steps(model, optimizer, n: int) -> None:
    for _ in range(n):
        model(torch.randn(6, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 99, (2,)).tolist()


def assert_same(a, b, where="") -> None:
    """Equal nested values, types included (tuples stay tuples, tensors keep dtype)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def make_states(seed: int, n_boxes: int = 5):
    crop = ContrastiveCrop(ContrastiveCropConfig(enabled=True), n_boxes)
    return TrainState(), crop, Extra(seed)


def saved_run(tmp_path: Path, opt: str):
    """A trained tiny model with states, checkpointed; -> (accelerator, checkpoint, originals, draws after save)."""
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(*tiny(0, opt))
    steps(model, optimizer, 3)
    state, crop, extra = make_states(1)
    state.epoch, state.step, state.step_in_epoch, state.monitors = 1, 3, 1, {"knn_top1_init": 12.5}
    crop.table.write([1, 3], torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.0, 0.3, 0.5, 1.0]]))
    crop.table.active = True
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ckpt = save_checkpoint(acc, tmp_path / "run", 3, {"config": {"a": 1}}, model=model, optimizer=optimizer,
                           states={"train": state, "ccrop": crop, "extra": extra})
    return acc, ckpt, (model, optimizer, state, crop, extra), draws()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_round_trip_restores_the_whole_state(tmp_path, opt):
    acc, ckpt, (model, optimizer, state, crop, extra), after_save = saved_run(tmp_path, opt)
    assert latest_checkpoint(tmp_path / "run") == ckpt
    model2, optimizer2 = acc.prepare(*tiny(1, opt))  # other weights, an empty optimizer state
    state2, crop2, extra2 = make_states(2)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # other RNG states
    load_checkpoint(acc, ckpt, model2, optimizer2, {"train": state2, "ccrop": crop2, "extra": extra2})
    assert draws() == after_save  # every RNG continues where the save left it
    assert_same(model.state_dict(), model2.state_dict(), "model")  # BatchNorm's running stats included
    assert_same(optimizer.state_dict(), optimizer2.state_dict(), "optimizer")
    kinds = {k for s in optimizer2.state_dict()["state"].values() for k in s}
    assert kinds == ({"momentum_buffer"} if opt == "sgd" else {"step", "exp_avg", "exp_avg_sq"})
    assert state2 == state
    assert np.array_equal(crop2.table.array, crop.table.array) and crop2.table.active
    assert_same(extra.d, extra2.d, "extra")
    # and training continues identically
    torch.manual_seed(3)
    steps(model, optimizer, 2)
    torch.manual_seed(3)
    steps(model2, optimizer2, 2)
    assert_same(model.state_dict(), model2.state_dict(), "model after 2 more steps")


def is_safetensors(data: bytes) -> bool:
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0) == len(data)


def test_no_file_is_a_pickle_and_loading_never_unpickles(tmp_path, monkeypatch):
    acc, ckpt, _, _ = saved_run(tmp_path, "adamw")
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng_0.json", "rng_0.safetensors", "state.json", "state.safetensors"]
    for p in ckpt.iterdir():
        data = p.read_bytes()
        assert not data.startswith(b"PK"), p  # torch.save's zip archive
        if p.suffix == ".json":
            assert not data.startswith(b"\x80"), p  # a pickle's protocol marker
            json.loads(data)
        else:  # a safetensors header's length may start with 0x80: the file must parse as safetensors instead
            assert p.suffix == ".safetensors" and is_safetensors(data), p

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load_checkpoint")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load"), (np, "load")]:
        monkeypatch.setattr(target, name, refuse)
    model2, optimizer2 = acc.prepare(*tiny(1, "adamw"))
    state2, crop2, extra2 = make_states(2)
    load_checkpoint(acc, ckpt, model2, optimizer2, {"train": state2, "ccrop": crop2, "extra": extra2})
    assert state2.step == 3 and crop2.table.active


def test_planted_pickles_are_never_run_by_load_checkpoint(tmp_path):
    armed(tmp_path)
    acc, ckpt, _, after_save = saved_run(tmp_path, "sgd")
    marker = tmp_path / "pwned"
    plant(ckpt, marker)
    model2, optimizer2 = acc.prepare(*tiny(1, "sgd"))
    state2, crop2, extra2 = make_states(2)
    load_checkpoint(acc, ckpt, model2, optimizer2, {"train": state2, "ccrop": crop2, "extra": extra2})
    assert not marker.exists()
    assert state2.step == 3 and draws() == after_save


def test_an_old_pickle_checkpoint_is_refused_unread(tmp_path):
    acc, ckpt, _, _ = saved_run(tmp_path, "sgd")
    for name in ("optimizer.json", "state.json", "state.safetensors", "rng_0.json"):  # what accelerate wrote
        (ckpt / name).unlink()
    marker = tmp_path / "pwned"
    plant(ckpt, marker)
    model2, optimizer2 = acc.prepare(*tiny(1, "sgd"))
    with pytest.raises(CheckpointError, match="no state.json.*pickles, which are not loaded"):
        load_checkpoint(acc, ckpt, model2, optimizer2, {"train": TrainState()})
    assert not marker.exists()


def test_states_must_match(tmp_path):
    acc, ckpt, _, _ = saved_run(tmp_path, "sgd")
    model2, optimizer2 = acc.prepare(*tiny(1, "sgd"))
    with pytest.raises(CheckpointError, match="holds no state other"):
        load_checkpoint(acc, ckpt, model2, optimizer2, {"train": TrainState(), "other": Extra(0)})
    acc2 = Accelerator(cpu=True)
    model3, optimizer3 = acc2.prepare(*tiny(1, "sgd"))
    acc2.register_for_checkpointing(Extra(0))  # Accelerate's registry: it would be missing from the checkpoint
    with pytest.raises(ValueError, match="register_for_checkpointing"):
        save_checkpoint(acc2, tmp_path / "b", 1, {}, model=model3, optimizer=optimizer3, states={"train": TrainState()})


def test_registered_states_are_saved_and_restored(tmp_path):
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(*tiny(0, "sgd"))
    extra = Extra(4)
    register_state(acc, "extra", extra)
    ckpt = save_checkpoint(acc, tmp_path, 1, {}, model=model, optimizer=optimizer, states={"train": TrainState(step=1)})
    extra.d = {}
    state = TrainState()
    load_checkpoint(acc, ckpt, model, optimizer, {"train": state})
    assert state.step == 1
    assert_same(extra.d, Extra(4).d)


def test_tree_codec_keeps_types_and_refuses_objects():
    value = {1: (np.float32(2.5), np.arange(3, dtype=np.uint32)), "s": [None, True, 1.5, float("inf"), "x"],
             "__odd": {"t": torch.arange(4, dtype=torch.int16).view(2, 2)[:, 0], "same": torch.ones(2)},
             "empty": ()}
    value["__odd"]["alias"] = value["__odd"]["same"]  # shared memory is stored twice
    tree, tensors = to_tree(value)
    json.dumps(tree)
    from safetensors.torch import load, save

    assert_same(from_tree(tree, load(save(tensors))), value)
    with pytest.raises(TypeError, match="cannot be stored"):
        to_tree({"bad": object()})
    with pytest.raises(TypeError, match="cannot be stored safely"):
        to_tree({"bad": np.array(["a"], dtype=object)})


def test_train_resume_ignores_planted_pickles(tiny_data, tmp_path):
    """train.py end to end: a checkpoint with malicious pickles beside the safe files resumes, and none runs."""
    from trainrun import TINY, run_train

    armed(tmp_path)
    args = [*TINY, f"data.root={tiny_data}", f"run.out_dir={tmp_path}", "run.name=r"]
    first = run_train(*args, "run.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "r" / "checkpoint-00000002"
    assert not [p.name for p in ckpt.iterdir() if p.suffix not in (".json", ".safetensors")]
    marker = tmp_path / "pwned"
    plant(ckpt, marker)
    second = run_train(*args, "run.max_steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {ckpt} at epoch 0, step 2" in second.stderr
    assert not marker.exists()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 3


def test_grad_scaler_and_accelerator_step_round_trip(tmp_path):
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(*tiny(0, "sgd"))
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what mixed_precision=fp16 sets up (on a GPU)
    acc.scaler.scale(torch.ones(1))
    acc.scaler.update(new_scale=8.0)
    acc.step = 5
    ckpt = save_checkpoint(acc, tmp_path, 1, {}, model=model, optimizer=optimizer, states={"train": TrainState()})
    acc.scaler, acc.step = torch.amp.GradScaler("cpu"), 0
    load_checkpoint(acc, ckpt, model, optimizer, {"train": TrainState()})
    assert acc.scaler.get_scale() == 8.0 and acc.step == 5


@pytest.mark.gpu
def test_cuda_rng_states_round_trip(tmp_path):
    acc = Accelerator(cpu=True)  # the CUDA generators are saved whenever CUDA is available
    model, optimizer = acc.prepare(*tiny(0, "sgd"))
    torch.cuda.manual_seed_all(11)
    ckpt = save_checkpoint(acc, tmp_path, 1, {}, model=model, optimizer=optimizer, states={"train": TrainState()})
    after = [torch.rand(4, device=f"cuda:{d}").tolist() for d in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(0)
    load_checkpoint(acc, ckpt, model, optimizer, {"train": TrainState()})
    assert [torch.rand(4, device=f"cuda:{d}").tolist() for d in range(torch.cuda.device_count())] == after
    assert len(json.loads((ckpt / "rng_0.json").read_text())["cuda"]) == torch.cuda.device_count()
