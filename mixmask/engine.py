"""The training engine: any iterable of Batch -> a trained self-supervised model, driven by Accelerate.

The model is any framework of mixmask/frameworks (the engine calls only its interface: ``model(batch)``
-> {"loss", parts...}, ``after_step``). One optimizer step (``train_step``) = ``grad_accum``
micro-batches (gradients synchronised on the last one only), then the framework's momentum/EMA update,
once. Parameter groups may carry ``lr_scale`` (lr = scale x the scheduled lr) and ``fixed_lr`` (never
decayed). The steady-state step never waits for the device: losses are summed on the device and read
(with the non-finite check) only at log steps and before every checkpoint (a non-finite loss since the
last read is a FloatingPointError, and save_checkpoint refuses non-finite weights: no checkpoint ever holds
weights from after a non-finite loss); with several processes the stop-signal all-reduce also runs only at
log steps. MIXMASK_FAULT (mixmask/faults.py, tests only) can kill the process or poison a step after it.
Learning rate: linear warm-up then cosine decay to 0, computed from the optimizer step alone
(``cosine_lr``), so it is exact on resume and needs no scheduler state. Checkpoints every
``checkpoint_every`` steps and at each epoch end hold everything needed to continue bit-for-bit:
weights (queue and key encoder included), optimizer, RNG states and the TrainState (epoch, step).
The data position is restored by the loader's ``set_epoch(epoch, start_batch)``: its order,
augmentations and masks are functions of (seed, epoch, index/step), not of history.

``before_epoch(epoch)``, if given, runs at the start of every epoch that starts from its first step (not
when resuming mid-epoch); its time is not training time. It must be a function of the model and the epoch
(ContrastiveCrop's box update), so a rerun after a crash at that point gives the same result.

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
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from mixmask import faults
from mixmask.checkpoint import save_checkpoint
from mixmask.indexlog import IndexLog


@dataclass
class TrainState:
    """The loop position and run-level facts, saved with every checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimizer steps done in total
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    samples: int = 0  # samples consumed in total, all processes (the data position, whatever the layout)
    epoch_samples: int = 0  # samples consumed in the current epoch: step_in_epoch x the global batch
    monitors: dict = field(default_factory=dict)  # the caller's monitor values (e.g. before training, latest)

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


def log_metrics(accelerator: Accelerator, run_dir: Path, state: TrainState, values: dict) -> None:
    """values at the current step to the trackers (TensorBoard) and, on the main process, a metrics.jsonl line
    {"step", "epoch", "time" (unix s), **values}: fit's log steps and monitors, and the caller's values outside
    the loop (kNN before and after training)."""
    accelerator.log(values, step=state.step)
    if accelerator.is_main_process:
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": state.step, "epoch": state.epoch, "time": time.time(), **values}) + "\n")


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up over ``warmup_steps`` then half-cosine from base_lr to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Each group's lr: its lr_scale x the scheduled lr (x base_lr for a fixed_lr group)."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("lr_scale", 1.0) * (base_lr if group.get("fixed_lr") else lr)


def train_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batches: Iterator, grad_accum: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """One optimizer step; returns the step's outputs (detached, on the device: no sync) and its images."""
    parts: dict[str, torch.Tensor] = {}
    images = 0
    for micro in range(grad_accum):
        b = next(batches)
        with nullcontext() if micro == grad_accum - 1 else accelerator.no_sync(model):
            out = model(b)
            accelerator.backward(out["loss"] / grad_accum)
        for k, v in out.items():
            parts[k] = parts.get(k, 0.0) + v.detach().float() / grad_accum
        images += b.size * accelerator.num_processes
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts, images


class Meter:
    """Sums step outputs on the device between log steps; ``read`` syncs once and checks finiteness."""

    def __init__(self, start: int, warm: int):
        self.warm, self.timed_images, self.timed_seconds = warm, 0, 0.0  # windows from step warm + 1 are timed
        self.train_seconds = 0.0  # every window: the wall time of training steps alone
        self.restart(start)

    def restart(self, step: int) -> None:
        self.sums, self.steps, self.first = {}, 0, step + 1
        self.restart_clock()

    def restart_clock(self) -> None:
        self.images, self.t0 = 0, time.perf_counter()

    def pause(self) -> None:
        """Count the window's time so far as training time, then time afresh (what follows is not training)."""
        self.train_seconds += time.perf_counter() - self.t0
        self.restart_clock()

    def add(self, parts: dict[str, torch.Tensor], images: int) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps, self.images = self.steps + 1, self.images + images

    def check(self, step: int) -> None:
        """FloatingPointError if a loss since the last read is non-finite (one sync: before a checkpoint)."""
        if self.steps and not math.isfinite(loss := float(self.sums["loss"])):
            raise FloatingPointError(f"loss is {loss} at a step in {self.first}..{step}; "
                                     "lower optim.lr or check the data")

    def read(self, step: int) -> dict[str, float]:
        means = dict(zip(self.sums, torch.stack(list(self.sums.values())).div(self.steps).tolist()))
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"loss is {means['loss']} at a step in {self.first}..{step}; "
                                     "lower optim.lr or check the data")
        dt = time.perf_counter() - self.t0
        self.train_seconds += dt
        if self.first > self.warm:
            self.timed_images, self.timed_seconds = self.timed_images + self.images, self.timed_seconds + dt
        means["images_per_sec"] = self.images / dt
        self.restart(step)
        return means


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
    monitor: Callable[[], dict[str, float]] | None = None,
    monitor_every: int = 1,
    before_epoch: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train until ``epochs`` (or ``max_steps``) and return timing/loss facts for the summary."""
    steps_per_epoch = len(loader) // grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch cannot make one step of {grad_accum} micro-batches")
    total_steps = epochs * steps_per_epoch
    end_step = min(total_steps, max_steps) if max_steps else total_steps
    start_step, net = state.step, accelerator.unwrap_model(model)
    trace = IndexLog.from_env(run_dir, accelerator.process_index)  # MIXMASK_LOG_INDICES=1: indices per step
    meter, stop, last = Meter(start_step, warm=start_step + max(2, (end_step - start_step) // 20)), StopOnSignal(), {}
    bar = tqdm(total=end_step, initial=state.step, desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)

    def log(values: dict) -> None:
        log_metrics(accelerator, run_dir, state, values)

    def checkpoint() -> None:
        meter.check(state.step)  # never a checkpoint of weights from after a non-finite loss
        save_checkpoint(accelerator, run_dir, state.step, config, keep_checkpoints, model=model, optimizer=optimizer,
                        states={"train": state})  # + the states of mixmask.checkpoint.register_state
        meter.restart_clock()  # checkpoint (and monitor) time is not training time

    def stop_requested(at_log: bool) -> bool:
        if accelerator.num_processes == 1:
            return stop.requested
        if not at_log:  # processes agree on a stop through one cheap all-reduce per log step
            return False
        flag = torch.tensor([float(stop.requested)], device=accelerator.device)
        stop.requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop.requested

    model.train()
    with stop:
        while state.epoch < epochs and state.step < end_step:
            if before_epoch is not None and state.step_in_epoch == 0:  # e.g. ContrastiveCrop's box update
                before_epoch(state.epoch)
                model.train()
                meter.restart_clock()  # not training time
            loader.set_epoch(state.epoch, state.step_in_epoch * grad_accum)
            batches = iter(loader) if trace is None else trace.wrap(iter(loader))
            while state.step_in_epoch < steps_per_epoch and state.step < end_step:
                lr = cosine_lr(state.step, total_steps, warmup_steps, base_lr)
                set_lr(optimizer, lr, base_lr)
                parts, images = train_step(accelerator, model, optimizer, batches, grad_accum)
                state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
                faults.after_step(state.step, net, parts)  # MIXMASK_FAULT (tests only): a no-op unless set
                state.samples, state.epoch_samples = state.samples + images, state.epoch_samples + images
                if trace is not None:
                    trace.write(state.epoch, state.step)
                net.after_step(state.step, total_steps)
                meter.add(parts, images)
                at_log = state.step % log_every == 0 or state.step == end_step or state.step - start_step <= 3
                stopping = stop_requested(at_log)
                if at_log or stopping:
                    last = {**meter.read(state.step), "lr": lr}
                    log(last)
                    bar.set_postfix(epoch=state.epoch, loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_sec']:.0f}")
                bar.update(1)
                if stopping:
                    break
                if checkpoint_every and state.step % checkpoint_every == 0 and state.step_in_epoch < steps_per_epoch:
                    meter.pause()
                    checkpoint()
            meter.pause()
            if state.step_in_epoch == steps_per_epoch:
                state.epoch, state.step_in_epoch, state.epoch_samples = state.epoch + 1, 0, 0
                if monitor is not None and monitor_every and state.epoch % monitor_every == 0 \
                        and state.epoch < epochs and not stop.requested:
                    values = monitor()
                    model.train()
                    state.monitors.update(values)
                    log(values)
                    bar.write(f"epoch {state.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
            checkpoint()
            if stop.requested:
                break
    bar.close()
    return {
        "steps": state.step,
        "steps_per_epoch": steps_per_epoch,
        "loss_final": last.get("loss", float("nan")),
        "images_per_sec": meter.timed_images / meter.timed_seconds if meter.timed_seconds else float("nan"),
        "train_seconds": meter.train_seconds,  # training steps only (no monitors, checkpoints, start-up)
        "bad_files": len(getattr(loader, "bad_files", ())),
        "interrupted": stop.signum,  # 0, or the signal that stopped the run
    }
