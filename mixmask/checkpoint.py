"""Atomic checkpoints through Accelerate's save_state / load_state.

A checkpoint is a directory ``checkpoint-<step>`` holding what ``Accelerator.save_state`` writes
(model.safetensors, optimizer.bin, per-process RNG states, the registered TrainState) plus the resolved
config (config.json). It is written to a hidden temporary directory and renamed into place, and
``latest`` (a one-line file, replaced atomically) names the newest one, so a crash at any moment leaves
the previous checkpoint intact and never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

LATEST = "latest"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, config: dict, keep: int = 2) -> Path:
    """Write checkpoint-<step> atomically (every process must call this)."""
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
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
