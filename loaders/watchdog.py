"""A watchdog for any loader: one that stops producing (a stuck DALI pipeline or feeder, FFCV thread, DataLoader
worker, or a decode that never returns) becomes a DataError after ``timeout`` seconds, never a hang.

    loader = watch(loader, timeout=cfg.data.timeout)     # timeout <= 0: the loader itself, unwrapped

``Watchdog`` wraps a loader of the engine's contract (len, ``set_epoch(epoch, start_batch)``, iteration of
Batch) or of the evaluation contract (len, ``set_epoch(epoch)``, iteration of (x, labels, index)) without
touching its internals; every other attribute (bad_files, stage, classes, close, ...) is the wrapped loader's.
Each pass (``iter``) is driven by a daemon thread in lockstep with the consumer: the thread advances the
wrapped iterator only when the consumer asks for the next item, and the consumer waits for it at most
``timeout`` seconds, then raises, in its own thread:

    DataError("dali loader produced no batch for 300 s (epoch 3, batch 41): stuck decoder/worker? ...")

Lockstep, not a read-ahead queue: the loader's code runs exactly when, and in the order, it would run
unwrapped, never concurrently with the training step. That keeps runs bit-identical and resumable: the
torchvision backend with workers=0 seeds and restores the global torch RNG around each sample
(``fork_rng``), checkpoints save that RNG, and the saliency mixer (saliency.source=encoder) runs the target
encoder inside the loader's iteration; a producer running ahead would interleave with all three. The
batches' content is keyed by (seed, epoch, index), not by the thread that iterates. Prefetching stays the
loaders' own (DataLoader workers, the DALI queue, FFCV's batches_ahead); the watchdog holds no batch and adds
two thread hand-offs per batch (tens of microseconds).

Exceptions raised by the wrapped loader reach the consumer with their own type (and traceback). Leaving a
pass early (break, max_steps, a signal, or dropping the iterator) closes the wrapped iterator in the
thread and ends it (waited for, so the next pass cannot overlap it); an iterator that is still busy (after
a timeout or an interrupt) is told to close as soon as its current item returns.

Thread-local state carried into the thread: for a loader on a CUDA device (``loader.device``, or ``device=``),
the consumer's current device index and current stream, captured when the pass starts (the thread calls
``torch.cuda.set_device`` and runs under ``torch.cuda.stream``), so pinned-memory threads, DALI's
``feed_ndarray``, FFCV's streams, the stage's kernels and ``non_blocking`` copies use the same device and
stream as unwrapped; and the consumer's grad mode, per item. Not carried: autocast (no loader is iterated
under it here).

Limits: Python cannot kill a thread, so a pass stuck in C code (a DALI or FFCV call, a decoder) stays stuck
after the error; its thread is a daemon, so it cannot keep the process from exiting, and a new pass of the
same Watchdog refuses to start (DataError) while the stuck one still runs. In a multi-process run only the
stuck process raises; the others wait in their next collective until it exits.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch

from loaders.folder import DataError

log = logging.getLogger(__name__)

_ITEM, _END, _ERROR, _TIMEOUT = "item", "end", "error", "timeout"
_STOP = object()  # request: close the wrapped iterator and end the thread


def backend_name(loader: Any) -> str:
    """The backend of a loader of loaders/: 'torchvision', 'dali', 'ffcv' (else its class name)."""
    module = type(loader).__module__.rsplit(".", 1)[-1]
    return module[: -len("_backend")] if module.endswith("_backend") else type(loader).__name__


def _cuda_target(device) -> tuple[int, torch.cuda.Stream] | None:
    """(device index, the consumer's current stream on it) for a CUDA device, else None; called in the
    consumer's thread (both are thread-local in torch / the CUDA runtime)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index)


class _Pass:
    """One pass over ``iterable``, advanced by a daemon thread one item per request."""

    def __init__(self, iterable, name: str, cuda: tuple[int, torch.cuda.Stream] | None):
        self.iterable, self.cuda = iterable, cuda
        self.requests: queue.SimpleQueue = queue.SimpleQueue()  # grad mode of the next item, or _STOP
        self.results: queue.SimpleQueue = queue.SimpleQueue()  # (kind, value): at most one in flight
        self.busy = False  # an item was asked for and not yet received
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        it = None
        try:
            if self.cuda is not None:
                torch.cuda.set_device(self.cuda[0])
            with torch.cuda.stream(self.cuda[1]) if self.cuda is not None else nullcontext():
                try:
                    while True:
                        request = self.requests.get()
                        if request is _STOP:
                            return
                        try:
                            with torch.set_grad_enabled(request):
                                if it is None:
                                    it = iter(self.iterable)
                                item = next(it)
                        except StopIteration:
                            self.results.put((_END, None))
                            return
                        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer, same type
                            self.results.put((_ERROR, e))
                            return
                        self.results.put((_ITEM, item))
                        del item  # the consumer owns it now: hold no batch
                finally:
                    close = getattr(it, "close", None)  # a generator's cleanup (FFCV closes its thread)
                    if close is not None:
                        try:
                            close()
                        except Exception:  # noqa: BLE001 - nobody is left to raise it to
                            log.exception("closing the loader's iterator failed")
        except BaseException as e:  # noqa: BLE001 - CUDA set-up failed: the consumer's first wait raises it
            self.results.put((_ERROR, e))

    def next(self, timeout: float) -> tuple[str, Any]:
        """The next (kind, value); (_TIMEOUT, None) when nothing came within ``timeout`` seconds."""
        self.requests.put(torch.is_grad_enabled())
        self.busy = True
        try:
            got = self.results.get(timeout=timeout)
        except queue.Empty:
            return _TIMEOUT, None
        self.busy = False
        return got

    def close(self, wait: float) -> None:
        """Ask the thread to close the wrapped iterator and end; wait up to ``wait`` s unless it is busy."""
        self.requests.put(_STOP)
        if not self.busy:
            self.thread.join(wait)
            if self.thread.is_alive():
                log.warning("%s: closing the loader's iterator took over %g s", self.thread.name, wait)


class Watchdog:
    """``loader`` with a watchdog: waiting over ``timeout`` seconds for an item raises DataError naming
    ``backend`` (default: from the loader's module), the epoch and the batch. timeout <= 0: no watchdog
    (the loader is iterated directly). device: the CUDA device the loader works on (default
    ``loader.device``). See the module docstring."""

    def __init__(self, loader, timeout: float, backend: str | None = None, device=None):
        self.loader, self.timeout = loader, float(timeout)
        self.backend = backend or backend_name(loader)
        self.device = device if device is not None else getattr(loader, "device", None)
        self._epoch, self._start_batch = 0, 0  # as set_epoch gave them (for the message)
        self._pass: _Pass | None = None  # the latest pass (a stuck one blocks the next)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, *args, **kwargs) -> None:
        """The wrapped loader's set_epoch (train: (epoch, start_batch); eval: (epoch)), noted for messages."""
        self.loader.set_epoch(epoch, *args, **kwargs)
        self._epoch, self._start_batch = epoch, args[0] if args else kwargs.get("start_batch", 0)

    def __getattr__(self, name: str):  # only for attributes this wrapper lacks (bad_files, stage, classes, ...)
        if name == "loader":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __repr__(self) -> str:
        return f"Watchdog({self.loader!r}, timeout={self.timeout:g}, backend={self.backend!r})"

    def _stuck(self, epoch: int, batch: int) -> DataError:
        return DataError(f"{self.backend} loader produced no batch for {self.timeout:g} s (epoch {epoch}, batch "
                         f"{batch}): stuck decoder/worker? raise data.timeout or check the data")

    def __iter__(self) -> Iterator:
        if self.timeout <= 0:
            yield from self.loader
            return
        epoch, batch = self._epoch, self._start_batch
        last = self._pass
        if last is not None and last.busy and last.thread.is_alive():  # left waiting: stuck, or interrupted
            last.thread.join(min(self.timeout, 5.0))  # an interrupted one may be closing
            if last.thread.is_alive():
                raise DataError(f"{self.backend} loader: a previous pass is still stuck; it cannot be iterated "
                                "again in this process")
        p = self._pass = _Pass(self.loader, f"watchdog-{self.backend}", _cuda_target(self.device))
        try:
            while True:
                kind, value = p.next(self.timeout if self.timeout > 0 else None)  # read at every wait
                if kind == _ITEM:
                    yield value
                    del value
                    batch += 1
                elif kind == _END:
                    return
                elif kind == _ERROR:
                    raise value
                else:
                    raise self._stuck(epoch, batch)
        finally:
            p.close(max(self.timeout, 1.0))


def watch(loader, timeout: float, backend: str | None = None, device=None):
    """``loader`` wrapped in a Watchdog, or ``loader`` itself when timeout <= 0 (data.timeout=0: never)."""
    return Watchdog(loader, timeout, backend, device) if timeout > 0 else loader
