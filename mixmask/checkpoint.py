"""Atomic checkpoints in safe formats only: safetensors and JSON, never a pickle.

A checkpoint is a directory ``checkpoint-<step>`` holding

    model.safetensors                     the (unwrapped) model's state_dict: weights and buffers (queue,
                                          key encoder...), keys without DDP's "module." prefix
    optimizer.safetensors, optimizer.json the optimizer's state_dict: its tensors (momentum buffers, exp_avg,
                                          exp_avg_sq, step...) under keys ``state.<param_id>.<name>``; the JSON holds
                                          the rest (param_groups: lr, momentum, betas, lr_scale...) with references
                                          to those keys
    state.safetensors, state.json         the named states (``train``: the engine's TrainState; ``ccrop``:
                                          ContrastiveCrop's box table...), Accelerate's step counter and the
                                          GradScaler (fp16) state
    rng_<rank>.safetensors, rng_<rank>.json  each process's RNG states: python ``random``, numpy's global
                                          generator, torch's CPU generator and every CUDA device's generator
    config.json                           the resolved config

Every file is read back with ``safetensors.torch.load_file`` or ``json``: resuming never unpickles anything
(no ``torch.load``, no ``pickle``), so a tampered checkpoint cannot run code. This is why Accelerate's
``save_state`` / ``load_state`` are not used: they write the optimizer, the RNG states and registered objects
with ``torch.save`` and read them back with ``torch.load`` (the registered objects with ``weights_only=False``).
A pickle planted in a checkpoint (``optimizer.bin``, ``random_states_0.pkl``, ``custom_checkpoint_0.pkl``) is
simply never opened.

The tree codec (``to_tree`` / ``from_tree``) stores a nested value of dicts, lists, tuples, None, bools, ints,
floats, strings, numpy scalars, torch tensors and numpy arrays as JSON plus one safetensors file of its tensors
and arrays (JSON refers to them by key), and rebuilds it exactly (tuples stay tuples, int dict keys stay ints,
arrays keep their dtype). Anything else is refused when saving. An object saved as a named state follows the
``Stateful`` protocol: ``state_dict()`` returning such a value and ``load_state_dict(d)``.

The directory is written to a hidden temporary directory and renamed into place, and ``latest`` (a one-line
file, replaced atomically) names the newest one, so a crash at any moment leaves the previous checkpoint intact
and never a half-written one that looks complete. With several processes the main process writes the shared
files and every process its own ``rng_<rank>`` pair.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file

log = logging.getLogger(__name__)

LATEST = "latest"
FORMAT = 1  # state.json's "format": the layout described above


class Stateful(Protocol):
    """What a named state is: a state_dict of tensors, numpy arrays and JSON-able values, and its inverse."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class CheckpointError(FileNotFoundError):
    """A checkpoint that cannot be resumed (missing or old-format files, a state it lacks)."""


# ---- the tree codec: JSON + safetensors -------------------------------------------------------------------

_TAGS = ("__tensor__", "__ndarray__", "__numpy__", "__tuple__", "__items__")


def to_tree(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested value -> (a JSON-able tree, its tensors by key). Tensors and arrays go to the dict (on the CPU,
    contiguous, never sharing memory), referenced from the tree by key (their path, e.g. ``state.3.exp_avg``)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()

    def put(path: str, t: torch.Tensor) -> str:
        key, n = path or "value", 1
        while key in tensors:
            key, n = f"{path}#{n}", n + 1
        t = t.detach().to("cpu").contiguous()
        where = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if where in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses tensors sharing memory (or views of a larger storage)
        storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        tensors[key] = t
        return key

    def enc(v: Any, path: str) -> Any:
        sub = (lambda k: f"{path}.{k}" if path else str(k))
        if isinstance(v, np.generic) and v.dtype.kind in "biuf":  # before float: np.float64 is a float
            return {"__numpy__": v.dtype.str, "value": v.item()}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor):
            return {"__tensor__": put(path, v)}
        if isinstance(v, np.ndarray):
            try:
                t = torch.from_numpy(np.ascontiguousarray(v))
            except TypeError as e:
                raise TypeError(f"{path}: a numpy array of dtype {v.dtype} cannot be stored safely") from e
            return {"__ndarray__": put(path, t)}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x, sub(i)) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, sub(i)) for i, x in enumerate(v)]
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in v):
                return {k: enc(x, sub(k)) for k, x in v.items()}
            return {"__items__": [[enc(k, sub("key")), enc(x, sub(k))] for k, x in v.items()]}
        raise TypeError(f"{path or 'value'}: {type(v).__name__} cannot be stored in a checkpoint "
                        "(tensors, numpy arrays and scalars, str, None, lists, tuples and dicts only)")

    return enc(value, ""), tensors


def from_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``to_tree``."""

    def tensor(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint's safetensors file")
        return tensors[key]

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            return tensor(v["__tensor__"])
        if "__ndarray__" in v:
            return tensor(v["__ndarray__"]).numpy()
        if "__numpy__" in v:
            return np.dtype(v["__numpy__"]).type(v["value"])
        if "__tuple__" in v:
            return tuple(dec(x) for x in v["__tuple__"])
        if "__items__" in v:
            return {dec(k): dec(x) for k, x in v["__items__"]}
        return {k: dec(x) for k, x in v.items()}

    return dec(tree)


def write_tree(folder: Path, name: str, value: Any) -> None:
    """``value`` as ``<name>.json`` + ``<name>.safetensors`` in ``folder``."""
    tree, tensors = to_tree(value)
    save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})
    (folder / f"{name}.json").write_text(json.dumps(tree))


def read_tree(folder: Path, name: str) -> Any:
    """What ``write_tree`` wrote (json and safetensors only: no pickle)."""
    files = [folder / f"{name}.json", folder / f"{name}.safetensors"]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} not found")
    return from_tree(json.loads(files[0].read_text()), load_file(str(files[1])))


# ---- what a checkpoint holds -------------------------------------------------------------------------------

_registered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # accelerator -> {name: Stateful}


def register_state(accelerator: Accelerator, name: str, obj: Stateful) -> None:
    """Save ``obj`` (``state_dict`` / ``load_state_dict``) as ``name`` in every checkpoint of ``accelerator`` and
    restore it in ``load_checkpoint``: the safe counterpart of ``accelerator.register_for_checkpointing``."""
    _registered.setdefault(accelerator, {})[name] = obj


def _states(accelerator: Accelerator, states: dict[str, Stateful] | None) -> dict[str, Stateful]:
    merged = dict(_registered.get(accelerator, {}))
    for name, obj in (states or {}).items():
        if merged.get(name, obj) is not obj:
            raise ValueError(f"two different objects for the checkpoint state {name!r}")
        merged[name] = obj
    known = {id(o) for o in merged.values()}
    stray = [type(o).__name__ for o in getattr(accelerator, "_custom_objects", []) if id(o) not in known]
    if stray:  # registered with Accelerate only: it would be silently missing from the checkpoint
        raise ValueError(f"{', '.join(stray)} registered with accelerator.register_for_checkpointing is not saved "
                         "by mixmask checkpoints: pass it in states= or use mixmask.checkpoint.register_state")
    return merged


def _sole(accelerator: Accelerator, attr: str, what: str):
    found = getattr(accelerator, attr, [])
    if len(found) != 1:
        raise ValueError(f"pass the {what}: the accelerator has {len(found)} prepared {what}s")
    return found[0]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for device, s in zip(range(torch.cuda.device_count()), state["cuda"]):
            torch.cuda.set_rng_state(s, device)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, config: dict, keep: int = 2, *,
                    model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    states: dict[str, Stateful] | None = None) -> Path:
    """Write checkpoint-<step> atomically (every process must call this). ``model`` / ``optimizer``: the prepared
    ones (default: the accelerator's only prepared model / optimizer); ``states``: named states, in addition to
    those of ``register_state``."""
    from accelerate.utils import save

    model = model if model is not None else _sole(accelerator, "_models", "model")
    optimizer = optimizer if optimizer is not None else _sole(accelerator, "_optimizers", "optimizer")
    states = _states(accelerator, states)
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model)  # every process (a sharded model gathers here)
    if accelerator.is_main_process:
        save(weights, tmp / "model.safetensors", safe_serialization=True)  # drops aliased tensors (tied weights)
        write_tree(tmp, "optimizer", optimizer.state_dict())
        scaler = getattr(accelerator, "scaler", None)
        write_tree(tmp, "state", {
            "format": FORMAT, "step": step, "processes": accelerator.num_processes,
            "accelerator_step": accelerator.step,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "states": {name: obj.state_dict() for name, obj in states.items()},
        })
    del weights
    write_tree(tmp, f"rng_{accelerator.process_index}", _rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(run_dir / LATEST, final.name + "\n")
        for old in sorted(run_dir.glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, ckpt_dir: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, states: dict[str, Stateful] | None = None) -> dict:
    """Restore what ``save_checkpoint`` wrote into the prepared ``model`` and ``optimizer``, the named ``states``
    (and those of ``register_state``), the GradScaler, Accelerate's step counter and this process's RNG states.
    Reads safetensors and JSON only. Every process calls it. -> the stored state.json values (step, ...)"""
    ckpt = Path(ckpt_dir)
    if not (ckpt / "state.json").is_file():
        legacy = [f for f in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl") if (ckpt / f).exists()]
        raise CheckpointError(
            f"{ckpt} has no state.json" + (f" (it holds {', '.join(legacy)}: an older mixmask wrote its state as "
                                           "pickles, which are not loaded)" if legacy else "")
            + "; it cannot be resumed: start a new run (another run.name) or set run.resume=false")
    states = _states(accelerator, states)
    saved = read_tree(ckpt, "state")
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: checkpoint format {saved.get('format')!r}, expected {FORMAT}")
    missing = sorted(set(states) - set(saved["states"]))
    if missing:
        raise CheckpointError(f"{ckpt} holds no state {', '.join(missing)} (it holds: "
                              f"{', '.join(saved['states']) or 'none'}); was it written with another configuration?")
    for name in sorted(set(saved["states"]) - set(states)):
        log.warning("checkpoint state %r of %s is not restored (nothing to restore it into)", name, ckpt)

    load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"), strict=True, device="cpu")
    optimizer.load_state_dict(read_tree(ckpt, "optimizer"))  # an AcceleratedOptimizer passes it to its optimizer
    for name, obj in states.items():
        obj.load_state_dict(saved["states"][name])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    accelerator.step = saved.get("accelerator_step", 0)
    rank = accelerator.process_index
    if (ckpt / f"rng_{rank}.json").is_file():
        _set_rng_state(read_tree(ckpt, f"rng_{rank}"))
    else:  # more processes than the run that wrote it
        log.warning("%s has no RNG state of process %d (written by %s processes): its RNGs are not restored",
                    ckpt, rank, saved.get("processes", "?"))
    return {k: v for k, v in saved.items() if k != "states"}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    marker = run_dir / LATEST
    if marker.is_file():
        path = run_dir / marker.read_text().strip()
        if (path / "model.safetensors").is_file():
            return path
    done = [p for p in sorted(run_dir.glob("checkpoint-*")) if (p / "model.safetensors").is_file()]
    return done[-1] if done else None


def resolve_weights(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its latest checkpoint) or a .safetensors file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            return ckpt / "model.safetensors"
    raise FileNotFoundError(f"no checkpoint found at {path} (expected a checkpoint-*/ folder, a run folder, or a .safetensors file)")
