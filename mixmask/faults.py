"""Fault injection for tests: the ``MIXMASK_FAULT`` environment variable.

Unset (always, outside tests) every hook is a no-op: one environment lookup per call, no other effect.
Set, it holds comma-separated ``what=step`` items; each fires once the run reaches that optimizer step:

    kill_at_step=N          SIGKILL this process right after optimizer step N (weights updated), before the
                            step is logged or checkpointed (mixmask/engine.py)
    kill_in_checkpoint=N    SIGKILL inside save_checkpoint of step N, once model.safetensors and the
                            optimizer files are in the temporary folder: before the rest, before the rename
    kill_before_latest=N    SIGKILL inside save_checkpoint of step N after checkpoint-N was renamed into
                            place, before ``latest`` is rewritten (it still names the previous checkpoint)
    enospc_in_checkpoint=N  save_checkpoint of step N fails with OSError(ENOSPC) when it starts writing the
                            optimizer (model.safetensors already written), as on a full disk
    nan_at_step=N           optimizer step N returns a NaN loss and leaves NaN weights, as a step on a
                            non-finite loss does (mixmask/engine.py)

e.g. ``MIXMASK_FAULT=kill_in_checkpoint=4 python train.py ...``. Every process that reaches the point is
affected (checkpoint files: the main process). An unknown item is a ValueError, so that a typo cannot turn a
fault test into a test of nothing. tests/test_faults.py drives these hooks; the code paths they interrupt
are the production ones.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "MIXMASK_FAULT"
KINDS = ("kill_at_step", "kill_in_checkpoint", "kill_before_latest", "enospc_in_checkpoint", "nan_at_step")


def faults() -> dict[str, int]:
    """The parsed ``MIXMASK_FAULT`` ({} when unset)."""
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        kind, eq, step = item.strip().partition("=")
        if kind not in KINDS or not eq or not step.strip().isdigit():
            raise ValueError(f"{ENV}: {item.strip()!r} is not one of {', '.join(k + '=STEP' for k in KINDS)}")
        out[kind] = int(step)
    return out


def due(kind: str, step: int) -> bool:
    """Whether ``MIXMASK_FAULT`` asks for ``kind`` at ``step``."""
    if ENV not in os.environ:  # the production path: nothing more
        return False
    return faults().get(kind) == step


def kill_if_due(kind: str, step: int) -> None:
    """SIGKILL this process (no handler, no cleanup, no flush: a crash) if ``kind`` is due at ``step``."""
    if due(kind, step):
        os.kill(os.getpid(), signal.SIGKILL)


def enospc_if_due(step: int, path) -> None:
    """Raise the OSError a full disk raises, for ``path``, if ``enospc_in_checkpoint`` is due at ``step``."""
    if due("enospc_in_checkpoint", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def after_step(step: int, model, parts: dict) -> None:
    """The engine's hook after optimizer step ``step``: ``kill_at_step`` and ``nan_at_step``."""
    if ENV not in os.environ:
        return
    kill_if_due("kill_at_step", step)
    if due("nan_at_step", step):
        import torch

        with torch.no_grad():
            for p in model.parameters():
                p.mul_(float("nan"))
        parts["loss"] = parts["loss"] * float("nan")
