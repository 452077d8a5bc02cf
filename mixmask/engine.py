"""The training engine: any iterable of Batch -> a trained Siamese model, driven by Accelerate.

One optimizer step = ``grad_accum`` micro-batches (gradients synchronised on the last one only).
Learning rate: linear warm-up then cosine decay to 0, computed from the optimizer step alone
(``cosine_lr``), so it is exact on resume and needs no scheduler state. Checkpoints every
``checkpoint_every`` steps and at each epoch end hold everything needed to continue bit-for-bit:
weights (queue and key encoder included), optimizer, RNG states and the TrainState (epoch, step).
The data position is restored by the loader's ``set_epoch(epoch, start_batch)``: its order,
augmentations and masks are functions of (seed, epoch, index/step), not of history.

SIGINT/SIGTERM: the step in flight finishes, a checkpoint is written and fit returns with
``interrupted`` set (all processes agree on the stop through one all-reduce per step); a second
signal aborts at once. Rerunning the same command resumes.

The loader contract: ``len(loader)`` batches per epoch per process, ``set_epoch(epoch, start_batch)``,
iteration yields mixmask.batch.Batch, optional ``bad_files`` (a set of skipped files).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from mixmask.checkpoint import save_checkpoint


@dataclass
class TrainState:
    """The loop position and run-level facts, saved with every checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimizer steps done in total
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    knn_init: float = float("nan")  # kNN top-1 of the network before training
    knn_last: float = float("nan")  # latest kNN top-1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class StopOnSignal:
    """While active, the first SIGINT/SIGTERM only sets ``requested``; a second one aborts."""

    def __init__(self):
        self.requested, self.signum, self._old = False, 0, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\nsignal {signum}: stopping after this step and writing a checkpoint (again to abort)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up over ``warmup_steps`` then half-cosine from base_lr to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    state: TrainState,
    *,
    run_dir: Path,
    config: dict,
    epochs: int,
    base_lr: float,
    warmup_steps: int = 0,
    grad_accum: int = 1,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    max_steps: int = 0,
    log_every: int = 10,
    monitor: Callable[[], float] | None = None,
    monitor_every: int = 1,
    progress: bool = True,
) -> dict:
    """Train until ``epochs`` (or ``max_steps``) and return timing/loss facts for the summary."""
    steps_per_epoch = len(loader) // grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch cannot make one step of {grad_accum} micro-batches")
    total_steps = epochs * steps_per_epoch
    end_step = min(total_steps, max_steps) if max_steps else total_steps
    warm = max(2, end_step // 20)  # steps excluded from the steady-state throughput
    start_step = state.step
    metrics_path = run_dir / "metrics.jsonl"
    bar = tqdm(
        total=end_step, initial=state.step, desc="train", unit="step",
        disable=not (progress and accelerator.is_main_process), dynamic_ncols=True,
    )
    timed_images = 0
    timed_seconds = 0.0
    last_loss = float("nan")

    def log(values: dict) -> None:
        accelerator.log(values, step=state.step)
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": state.step, "epoch": state.epoch, **values}) + "\n")

    def checkpoint() -> None:
        save_checkpoint(accelerator, run_dir, state.step, config, keep_checkpoints)

    stop = StopOnSignal()

    def stop_requested() -> bool:
        if accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=accelerator.device)
        stop.requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop.requested

    model.train()
    with stop:
        while state.epoch < epochs and state.step < end_step:
            loader.set_epoch(state.epoch, state.step_in_epoch * grad_accum)
            batches = iter(loader)
            while state.step_in_epoch < steps_per_epoch and state.step < end_step:
                t0 = time.perf_counter()
                lr = cosine_lr(state.step, total_steps, warmup_steps, base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = 0
                for micro in range(grad_accum):
                    b = next(batches)
                    sync = micro == grad_accum - 1
                    with nullcontext() if sync else accelerator.no_sync(model):
                        out = model(b.x1, b.x2, b.mixed, b.perm, b.lam)
                        accelerator.backward(out["loss"] / grad_accum)
                    images += b.size * accelerator.num_processes
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.step_in_epoch += 1
                last_loss = out["loss"].item()  # also synchronises the device: honest step timing
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss is {last_loss} at step {state.step}; lower optim.lr or check the data")
                dt = time.perf_counter() - t0
                if state.step - start_step > warm:
                    timed_images += images
                    timed_seconds += dt
                if state.step % log_every == 0 or state.step == end_step or state.step - start_step <= 3:
                    values = {"loss": last_loss, "lr": lr, "images_per_sec": images / dt}
                    values.update({k: v.item() for k, v in out.items() if k != "loss"})
                    log(values)
                bar.set_postfix(epoch=state.epoch, loss=f"{last_loss:.3f}", img_s=f"{images / dt:.0f}")
                bar.update(1)
                if stop_requested():
                    break
                if checkpoint_every and state.step % checkpoint_every == 0 and state.step_in_epoch < steps_per_epoch:
                    checkpoint()
            if state.step_in_epoch == steps_per_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
                due = monitor is not None and monitor_every and state.epoch % monitor_every == 0
                if due and state.epoch < epochs and not stop.requested:
                    state.knn_last = monitor()
                    model.train()
                    log({"knn_top1": state.knn_last})
                    bar.write(f"epoch {state.epoch}: kNN top-1 {state.knn_last:.2f}%")
            checkpoint()
            if stop.requested:
                break
    bar.close()
    return {
        "steps": state.step,
        "steps_per_epoch": steps_per_epoch,
        "loss_final": last_loss,
        "images_per_sec": timed_images / timed_seconds if timed_seconds else float("nan"),
        "bad_files": len(getattr(loader, "bad_files", ())),
        "interrupted": stop.signum,  # 0, or the signal that stopped the run
    }
