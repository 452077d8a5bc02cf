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
    manifest.json                         written last: every other file's name and size, the checkpoint's id and
                                          its predecessor's id (what ``latest`` resolved to when it was written)

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

The directory is written to a hidden temporary directory (``.tmp-checkpoint-<step>``) and renamed into place,
and ``latest`` (a one-line file, replaced atomically) names the newest one, so a crash at any moment leaves the
previous checkpoint intact and never a half-written one that looks complete. With several processes the main
process writes the shared files and every process its own ``rng_<rank>`` pair.

Crashes (SIGKILL, power loss of the process, OOM killer) at any instant:
- a checkpoint folder is *complete* when every file its manifest.json lists is there with its size
  (``is_complete``; a folder of an older mixmask, without a manifest: when it has model.safetensors);
- ``latest_checkpoint`` returns the complete checkpoint ``latest`` names, or a complete one written after it
  that names it as its predecessor (a crash after the rename, before ``latest`` was rewritten); with no usable
  ``latest`` (none, or naming a deleted or incomplete folder), the complete checkpoint written last. The
  temporary folders are never read, and the next save removes them;
- pruned checkpoints (``keep``) are renamed to a temporary name before they are deleted, so a crash during
  the deletion never leaves a partial ``checkpoint-*`` folder.
Failures while writing (``CheckpointWriteError``, e.g. a full disk: one line naming the file, the space a
checkpoint needs and the space free; train.py prints it as ``error: ...`` and exits with 2): the temporary
folder is removed and the previous checkpoint stays the latest; every process raises. Non-finite weights
(NaN/inf, e.g. after a non-finite loss) are never written: save_checkpoint raises FloatingPointError (train.py:
one ``error:`` line, exit 2) and writes nothing, so the last checkpoint is the last good one.

Fault injection for tests: with the environment variable ``MIXMASK_FAULT`` (mixmask/faults.py, e.g.
``kill_in_checkpoint=4``, ``kill_before_latest=4``, ``enospc_in_checkpoint=4``) save_checkpoint SIGKILLs its
own process or fails with ENOSPC at a given point of a given step's save; unset, those hooks do nothing.
tests/test_faults.py uses them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file

from mixmask import faults

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-checkpoint-"  # temporary folders: being written, or being deleted
FORMAT = 1  # state.json's "format": the layout described above


class Stateful(Protocol):
    """What a named state is: a state_dict of tensors, numpy arrays and JSON-able values, and its inverse."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class CheckpointError(FileNotFoundError):
    """A checkpoint that cannot be resumed (missing or old-format files, a state it lacks)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk...): its temporary folder is gone, the previous one stays."""

    def __str__(self) -> str:  # the message alone, without "[Errno 28]"
        return self.strerror or super().__str__()


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


def _discard(path: Path) -> None:
    """Delete a folder so that it never exists half-deleted under its name: rename, then delete."""
    trash = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as safetensors' SafetensorError ("... (os error 28)")."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return getattr(e, "errno", None) in codes or any(f"(os error {c})" in str(e) for c in codes) \
        or "No space left on device" in str(e)


def _write_error(e: BaseException, path: Path, run_dir: Path, final: Path, previous: Path | None, need: int,
                 renamed: bool) -> CheckpointWriteError:
    """One line: what failed where, the space needed and free, what is left."""
    free = shutil.disk_usage(run_dir).free  # after the temporary folder was removed
    after = (f"{final.name} is complete but {LATEST} was not updated (the next run finds it)" if renamed
             else f"the temporary folder was removed; {previous.name if previous else 'no earlier checkpoint'} "
                  "is the latest complete checkpoint")
    if _disk_full(e):
        return CheckpointWriteError(
            errno.ENOSPC, f"no space left on the device writing checkpoint file {path}: a checkpoint needs about "
            f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free in {run_dir}; {after}; free some space and run the "
            "same command again to resume")
    why = " ".join(str(e).split()) or type(e).__name__
    return CheckpointWriteError(getattr(e, "errno", None) or errno.EIO,
                                f"cannot write checkpoint file {path}: {why}; {after}")


def _any_failed(accelerator: Accelerator, failed: bool) -> bool:
    """Whether any process failed (an all-reduce: also the barrier of every process)."""
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor([float(failed)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _check_finite(weights: dict, final: Path, previous: Path | None) -> None:
    floats = [(k, t) for k, t in weights.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu().tolist()  # one sync
    bad = [k for (k, _), ok in zip(floats, finite) if not ok]
    if bad:
        raise FloatingPointError(
            f"{final.name} not written: non-finite weights ({bad[0]}" + (f" and {len(bad) - 1} more" if bad[1:] else "")
            + f"); the last good checkpoint is {previous if previous else 'none'}; lower optim.lr or check the data")


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, config: dict, keep: int = 2, *,
                    model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    states: dict[str, Stateful] | None = None) -> Path:
    """Write checkpoint-<step> atomically (every process must call this). ``model`` / ``optimizer``: the prepared
    ones (default: the accelerator's only prepared model / optimizer); ``states``: named states, in addition to
    those of ``register_state``. Raises FloatingPointError (non-finite weights: nothing written) or
    CheckpointWriteError (a write failed: the temporary folder removed), on every process."""
    from accelerate.utils import save

    model = model if model is not None else _sole(accelerator, "_models", "model")
    optimizer = optimizer if optimizer is not None else _sole(accelerator, "_optimizers", "optimizer")
    states = _states(accelerator, states)
    main = accelerator.is_main_process
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f"{TMP_PREFIX}{step:08d}"
    previous = latest_checkpoint(run_dir) if main else None
    if main:
        for stale in run_dir.glob(f"{TMP_PREFIX}*"):  # left by a crash: never complete, never read
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model)  # every process (a sharded model gathers here)
    failure, path, need = None, tmp, 0
    try:
        if main:
            _check_finite(weights, final, previous)
            path = tmp / "model.safetensors"
            save(weights, path, safe_serialization=True)  # drops aliased tensors (tied weights)
            path = tmp / "optimizer.safetensors"
            faults.enospc_if_due(step, path)
            write_tree(tmp, "optimizer", optimizer.state_dict())
            faults.kill_if_due("kill_in_checkpoint", step)
            path = tmp / "state.safetensors"
            scaler = getattr(accelerator, "scaler", None)
            write_tree(tmp, "state", {
                "format": FORMAT, "step": step, "processes": accelerator.num_processes,
                "accelerator_step": accelerator.step,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "states": {name: obj.state_dict() for name, obj in states.items()},
            })
        path = tmp / f"rng_{accelerator.process_index}.safetensors"
        write_tree(tmp, f"rng_{accelerator.process_index}", _rng_state())
    except Exception as e:  # noqa: BLE001 - every process must learn of it before anyone raises
        failure = e
        if main and not isinstance(e, FloatingPointError):
            try:  # the space a checkpoint needs: the previous one's, else the tensors' bytes
                need = _folder_bytes(previous) if previous else \
                    _tensor_bytes(weights) + _tensor_bytes(optimizer.state_dict())
            except OSError:
                need = _tensor_bytes(weights)
    del weights
    renamed = False
    if not _any_failed(accelerator, failure is not None) and main:
        try:
            path = tmp / "config.json"
            path.write_text(json.dumps(config, indent=2))
            path = tmp / MANIFEST
            before = _manifest(previous) if previous else None
            manifest = {"step": step, "id": uuid.uuid4().hex, "previous": (before or {}).get("id"),
                        "time": time.time(), "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}}
            path.write_text(json.dumps(manifest, indent=1))  # last: the folder is complete
            if final.exists():  # the same step written again
                _discard(final)
            os.replace(tmp, final)
            renamed = True
            faults.kill_if_due("kill_before_latest", step)
            path = run_dir / LATEST
            _atomic_write(path, final.name + "\n")
        except Exception as e:  # noqa: BLE001
            failure = e
            try:
                need = _folder_bytes(final if renamed else tmp)
            except OSError:
                pass
    if _any_failed(accelerator, failure is not None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            (run_dir / f".{LATEST}.tmp").unlink(missing_ok=True)
        if isinstance(failure, (OSError, SafetensorError)):
            raise _write_error(failure, path, run_dir, final, previous, need, renamed) from failure
        if failure is not None:
            raise failure
        raise CheckpointWriteError(errno.EIO, f"{final.name} not written: another process failed (its error says why)")
    if main:  # never the new one: after run.resize=rescale_lr an older checkpoint may carry a higher step number
        for old in [p for p in sorted(run_dir.glob("checkpoint-*"))[:-keep] if p != final]:
            _discard(old)
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
    if (ckpt / MANIFEST).exists() and not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is incomplete (a file its {MANIFEST} lists is missing or truncated); "
                              "it cannot be resumed")
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


def _manifest(path: Path) -> dict | None:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder holds every file it was written with: those its manifest.json lists, with
    their sizes (a folder of an older mixmask, without a manifest: model.safetensors; load_checkpoint judges
    the rest)."""
    if not (path / MANIFEST).exists():
        return (path / "model.safetensors").is_file()
    files = (_manifest(path) or {}).get("files")
    if not isinstance(files, dict) or not files:
        return False
    try:
        return all((path / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None: the one ``latest`` names, or one written
    after it that names it as its predecessor (a crash between the rename and the update of ``latest``); with
    no usable ``latest``, the one written last. Temporary folders and incomplete checkpoints are never
    returned."""
    run_dir = Path(run_dir)
    done = [p for p in sorted(run_dir.glob("checkpoint-*")) if p.is_dir() and is_complete(p)]
    if not done:
        return None
    manifests = {p: _manifest(p) or {} for p in done}

    def written(p: Path) -> tuple:  # the write time in the manifest (a copy keeps it), else the name order
        t = manifests[p].get("time")
        return (1, t, p.name) if isinstance(t, (int, float)) else (0, 0.0, p.name)

    marker = run_dir / LATEST
    try:
        name = marker.read_text().strip() if marker.is_file() else ""
    except OSError:
        name = ""
    current = next((p for p in done if p.name == name), None)
    if current is None:
        return max(done, key=written)
    seen = {current}
    while True:  # successors of current: written after it, before `latest` named them
        cid = manifests[current].get("id")
        after = [p for p in done if cid and p not in seen and manifests[p].get("previous") == cid]
        if not after:
            return current
        current = max(after, key=written)
        seen.add(current)


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
