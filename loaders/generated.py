"""Generated datasets cached on disk: written once, atomically, and regenerated when their parameters change.

Used by the embedded demo dataset (loaders/demo.py) and the benchmarks' ImageNet-like JPEG set
(benchmarks/imagenet_like.py). The folder is written into a temporary sibling, completed with the
marker file root/.complete (JSON of the parameters) and then renamed into place, all under an flock
on root's sibling '<name>.lock', so concurrent callers (ranks) generate once and a crash never leaves
a folder that passes for complete. A root whose marker is missing or records other parameters is
regenerated.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

try:  # POSIX only; elsewhere concurrent callers rely on the benign rename race below.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MARKER = ".complete"


def is_complete(root: Path, params: dict) -> bool:
    """True when root holds a finished generation with exactly these parameters."""
    try:
        return json.loads((root / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock) held for the duration of the block."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a") as f:  # never deleted: deleting a lock file races other holders
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_generated(root: Path, params: dict, generate: Callable[[Path], None]) -> Path:
    """Return root holding the output of generate(folder) for these (JSON-able) parameters.

    generate writes the dataset into the empty folder it is given; the marker is added after it returns.
    """
    params = json.loads(json.dumps(params))  # compare as the marker will read back (tuples -> lists)
    if is_complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(root.with_name(root.name + ".lock")):
        if is_complete(root, params):  # another process finished while we waited
            return root
        if fcntl is not None:  # we hold the lock: leftovers of killed generators are garbage
            for stale in root.parent.glob(f".{root.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            generate(tmp)
            (tmp / MARKER).write_text(json.dumps(params))  # last: its presence means complete
            if root.exists():  # incomplete or other parameters
                shutil.rmtree(root)
            try:
                os.rename(tmp, root)
            except OSError:  # without flock: another process won the race; keep theirs if valid
                if not is_complete(root, params):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
