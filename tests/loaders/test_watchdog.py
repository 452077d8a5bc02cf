"""The loader watchdog (loaders/watchdog.py): a loader that stops producing raises DataError naming the backend
and the batch within the timeout; errors keep their type; early exits end the thread; the contract is
forwarded; batches are identical to the unwrapped loader's; the real torchvision (and DALI) loaders with a
decode that never returns; data.timeout in the config and train.py's builders. Every wait is bounded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loaders.folder import DataError, index_split
from loaders.watchdog import Watchdog, backend_name, watch

REPO = Path(__file__).resolve().parents[2]


class FakeLoader:
    """The engine contract: len, set_epoch(epoch, start_batch), iteration; batch i of epoch e is (e, i).
    stuck_at: the batch whose production waits on ``release`` (or, poll=True, polls like FFCV's live
    thread); fail_at: the batch that raises ValueError."""

    device = torch.device("cpu")

    def __init__(self, n=5, stuck_at=None, fail_at=None, poll=False):
        self.n, self.stuck_at, self.fail_at, self.poll = n, stuck_at, fail_at, poll
        self.epoch, self.start = 0, 0
        self.bad_files = {"a.jpg"}
        self.release = threading.Event()
        self.closed = threading.Event()
        self.threads: list[threading.Thread] = []

    def __len__(self):
        return self.n

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        self.threads.append(threading.current_thread())
        try:
            for i in range(self.start, self.n):
                if i == self.stuck_at:
                    while not self.release.wait(0.02 if self.poll else 30):
                        pass
                if i == self.fail_at:
                    raise ValueError(f"bad batch {i}")
                yield self.epoch, i
        finally:
            self.closed.set()


def collect(it, out):
    for item in it:
        out.append(item)


@pytest.mark.parametrize("poll", [False, True], ids=["blocked", "polling"])
def test_stuck_loader_raises_naming_backend_and_batch(poll):
    fake = FakeLoader(stuck_at=2, poll=poll)
    ld = Watchdog(fake, timeout=0.5, backend="dali")
    ld.set_epoch(3)
    got, t0 = [], time.perf_counter()
    with pytest.raises(DataError, match=r"dali loader produced no batch for 0.5 s \(epoch 3, batch 2\): stuck"):
        collect(ld, got)
    assert 0.4 < time.perf_counter() - t0 < 3.0
    assert got == [(3, 0), (3, 1)]
    assert fake.threads[0] is not threading.current_thread() and fake.threads[0].daemon
    fake.release.set()  # the stuck thread resumes, sees the stop request, closes the iterator and ends
    fake.threads[0].join(5)
    assert not fake.threads[0].is_alive() and fake.closed.is_set()


def test_batch_number_counts_from_start_batch():
    ld = Watchdog(FakeLoader(stuck_at=3), timeout=0.3, backend="ffcv")
    ld.set_epoch(1, 2)
    with pytest.raises(DataError, match=r"ffcv loader .* \(epoch 1, batch 3\)"):
        list(ld)
    ld.loader.release.set()


def test_producer_errors_keep_their_type():
    fake = FakeLoader(fail_at=1)
    got = []
    with pytest.raises(ValueError, match="bad batch 1"):
        collect(Watchdog(fake, timeout=5), got)
    assert got == [(0, 0)]
    fake.threads[0].join(5)
    assert not fake.threads[0].is_alive()


def test_error_in_iter_itself_reaches_the_consumer():
    class NoIter(FakeLoader):
        def __iter__(self):
            raise KeyError("no pipeline")

    with pytest.raises(KeyError, match="no pipeline"):
        list(Watchdog(NoIter(), timeout=5))


def test_breaking_out_early_ends_the_thread_and_closes_the_iterator():
    fake = FakeLoader(n=100)
    ld = Watchdog(fake, timeout=5)
    for epoch in range(3):  # as the engine: a new iter per epoch, the last one dropped unfinished
        ld.set_epoch(epoch)
        it = iter(ld)
        assert next(it) == (epoch, 0) and next(it) == (epoch, 1)
        del it  # max_steps / a signal: the pass is abandoned
        fake.threads[-1].join(5)
        assert not fake.threads[-1].is_alive() and fake.closed.is_set()
        fake.closed.clear()
    assert len({id(t) for t in fake.threads}) == 3 and threading.current_thread() not in fake.threads
    assert all(t.daemon or not t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()
               and t.name.startswith("watchdog"))


def test_contract_is_forwarded():
    fake = FakeLoader(n=7)
    ld = watch(fake, timeout=10)
    assert isinstance(ld, Watchdog) and watch(fake, timeout=0) is fake
    assert len(ld) == 7 and ld.bad_files == {"a.jpg"} and ld.device == torch.device("cpu")
    ld.set_epoch(4, 5)
    assert (fake.epoch, fake.start) == (4, 5)
    assert list(ld) == [(4, 5), (4, 6)]
    with pytest.raises(AttributeError):
        ld.no_such_attribute
    assert backend_name(fake) == "FakeLoader"


def test_eval_contract_set_epoch_with_one_argument():
    class Eval(FakeLoader):
        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            for i in range(self.n):
                yield torch.full((2,), float(i)), torch.tensor([i]), torch.tensor([i])

    ld = Watchdog(Eval(n=3), timeout=5)
    ld.set_epoch(2)
    assert ld.loader.epoch == 2
    assert [int(y) for _, y, _ in ld] == [0, 1, 2]


def test_grad_mode_of_the_consumer_is_carried():
    class Grad(FakeLoader):
        def __iter__(self):
            while True:
                yield torch.is_grad_enabled()

    ld = Watchdog(Grad(), timeout=5)
    it = iter(ld)
    with torch.no_grad():
        assert next(it) is False
    assert next(it) is True


def test_a_stuck_pass_blocks_the_next_one():
    fake = FakeLoader(stuck_at=0)
    ld = Watchdog(fake, timeout=0.2)
    with pytest.raises(DataError, match="batch 0"):
        list(ld)
    with pytest.raises(DataError, match="previous pass is still stuck"):
        list(ld)
    fake.release.set()
    fake.threads[0].join(5)
    assert list(ld) == [(0, i) for i in range(5)]  # recovered: a fresh pass


def test_signals_while_waiting():
    """A handler that returns (the engine's first SIGINT) does not cut the wait short; one that raises
    (the second) gets through at once."""
    import signal

    fake = FakeLoader(stuck_at=1)
    ld = Watchdog(fake, timeout=30)
    seen = []

    def note(signum, frame):
        seen.append(signum)
        threading.Timer(0.3, fake.release.set).start()

    def abort(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, note)
    try:
        it = iter(ld)
        assert next(it) == (0, 0)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        assert next(it) == (0, 1) and seen == [signal.SIGALRM]  # released 0.3 s after the signal
        fake.release.clear()
        fake.stuck_at = 3
        assert next(it) == (0, 2)
        signal.signal(signal.SIGALRM, abort)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            next(it)
        assert time.perf_counter() - t0 < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    fake.release.set()
    fake.threads[0].join(5)
    assert not fake.threads[0].is_alive() and fake.closed.is_set()


def test_stuck_thread_does_not_block_interpreter_exit():
    script = textwrap.dedent("""
        import threading
        from loaders.folder import DataError
        from loaders.watchdog import Watchdog

        class Stuck:
            def __len__(self):
                return 1
            def __iter__(self):
                threading.Event().wait()  # forever
                yield 0

        try:
            list(Watchdog(Stuck(), timeout=0.2, backend="torchvision"))
        except DataError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torchvision loader produced no batch for 0.2 s (epoch 0, batch 0)" in out.stdout


# --- the real loaders -----------------------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _stage():
    from mixmask.mixing import MixMask, MixStage

    return MixStage(MEAN, STD, dtype=torch.float32, channels_last=True, mixer=MixMask(grid=4, ratio=0.5))


def _torchvision(root):
    from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader

    return TorchvisionTrainLoader(index_split(root, "train"), AugParams(24), _stage(), batch_size=16, workers=0)


def test_torchvision_batches_identical_to_unwrapped(tiny_data):
    plain, wrapped = _torchvision(tiny_data), watch(_torchvision(tiny_data), timeout=30)
    torch.manual_seed(123)  # the global RNG, which the workers=0 loader forks around each sample
    for ld in (plain, wrapped):
        ld.set_epoch(1, 2)
    a = list(plain)
    state_a = torch.get_rng_state()
    torch.manual_seed(123)
    b = list(wrapped)
    assert torch.equal(state_a, torch.get_rng_state())  # the global RNG is left as unwrapped
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for f in ("index", "labels", "x1", "x2", "mixed", "mask", "lam"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f


def test_torchvision_workers_across_passes_identical_to_unwrapped(tiny_data):
    """DataLoader worker processes (persistent) started from one pass's thread and driven by the next's."""
    from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader

    plain = _torchvision(tiny_data)
    ld = watch(TorchvisionTrainLoader(index_split(tiny_data, "train"), AugParams(24), _stage(), batch_size=16,
                                      workers=2), timeout=60)
    ld.set_epoch(0)
    for _ in ld:
        break  # a pass left early: the next one must start cleanly
    for ld_ in (plain, ld):
        ld_.set_epoch(1)
    for x, y in zip(plain, ld, strict=True):
        assert torch.equal(x.index, y.index) and torch.equal(x.x1, y.x1) and torch.equal(x.mixed, y.mixed)


def test_torchvision_decode_that_never_returns(tiny_data, monkeypatch):
    import loaders.torchvision_backend as tv

    release, calls, real = threading.Event(), [], tv.decode_image

    def decode(path):
        calls.append(path)
        if len(calls) == 2 * 16 + 1:  # the first image of batch 2 (workers=0: in the loader's thread)
            release.wait(30)
        return real(path)

    monkeypatch.setattr(tv, "decode_image", decode)
    ld = watch(_torchvision(tiny_data), timeout=60)  # room for the first batch on a busy machine
    ld.set_epoch(0)
    it = iter(ld)
    got = [next(it)]
    ld.timeout = 0.5  # read at every wait
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"torchvision loader produced no batch for 0.5 s \(epoch 0, batch 2\)"):
        collect(it, got)
    assert time.perf_counter() - t0 < 10 and len(got) == 2
    release.set()
    ld._pass.thread.join(10)
    assert not ld._pass.thread.is_alive()


@pytest.mark.dali
def test_dali_feeder_that_never_returns(tiny_data, monkeypatch):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install '.[dali]')")
    import loaders.dali_backend as db
    from loaders.torchvision_backend import AugParams

    release, calls, real = threading.Event(), [], db._read

    def read(paths, i, bad):
        calls.append(i)
        if len(calls) == 3 * 16 + 1:  # the feeder's 4th batch; the pipeline prefetches 2
            release.wait(30)
        return real(paths, i, bad)

    monkeypatch.setattr(db, "_read", read)
    ld = watch(db.DaliTrainLoader(index_split(tiny_data, "train"), AugParams(24), _stage(), 16, threads=1, prefetch=2),
               timeout=120)  # the first batch builds the pipeline and compiles its numba operators
    ld.set_epoch(0)
    it = iter(ld)
    got = [next(it)]
    ld.timeout = 1.0
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"dali loader produced no batch for 1 s \(epoch 0, batch [123]\)"):
        collect(it, got)
    assert time.perf_counter() - t0 < 10 and 1 <= len(got) <= 3
    release.set()
    ld._pass.thread.join(20)
    assert not ld._pass.thread.is_alive()


# --- configuration and train.py --------------------------------------------------------------------------

def test_config_timeout_field():
    from mixmask.config import ConfigError, load_config

    assert load_config().data.timeout == 300.0
    assert load_config(overrides=["data.timeout=0"]).data.timeout == 0.0
    with pytest.raises(ConfigError, match="data.timeout must be >= 0"):
        load_config(overrides=["data.timeout=-1"])


def test_train_builders_wrap_when_timeout_is_set(tiny_data):
    import train
    from loaders.torchvision_backend import AugParams, TorchvisionEvalLoader, TorchvisionTrainLoader
    from mixmask.config import load_config

    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), mixed_precision="no")
    index = index_split(tiny_data, "train")
    for timeout in (7.0, 0.0):
        cfg = load_config(overrides=[f"data.timeout={timeout}", "data.workers=0", "data.batch_size=16"])
        tr = train.train_loader(cfg, acc, index, AugParams(24))
        ev = train.eval_loader(cfg, acc, tiny_data, "val")
        if timeout:
            assert isinstance(tr, Watchdog) and isinstance(tr.loader, TorchvisionTrainLoader) and tr.timeout == 7.0
            assert isinstance(ev, Watchdog) and isinstance(ev.loader, TorchvisionEvalLoader)
            assert tr.backend == ev.backend == "torchvision" and tr.stage is tr.loader.stage
        else:
            assert isinstance(tr, TorchvisionTrainLoader) and isinstance(ev, TorchvisionEvalLoader)
