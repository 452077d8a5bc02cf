"""A debug trace of the samples behind every optimizer step (tests of the data position: resume, resize).

With ``MIXMASK_LOG_INDICES=1`` in the environment, ``fit`` appends one JSON line per optimizer step to
``<run_dir>/indices_rank<r>.jsonl`` of each process r: ``{"epoch", "step", "index": [...]}``, the dataset
indices (Batch.index) of that process's micro-batches of the step, in order. The union over the ranks' files
of one step's lines is the step's global batch. Off by default: it reads the indices back every step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

ENV = "MIXMASK_LOG_INDICES"


class IndexLog:
    """Collects Batch.index of the batches drawn through ``wrap`` and writes them at each ``write``."""

    def __init__(self, run_dir: Path, rank: int):
        self.path, self.seen = Path(run_dir) / f"indices_rank{rank}.jsonl", []

    @classmethod
    def from_env(cls, run_dir: Path, rank: int) -> IndexLog | None:
        return cls(run_dir, rank) if os.environ.get(ENV, "") == "1" else None

    def wrap(self, batches: Iterator) -> Iterator:
        for b in batches:
            self.seen.extend(int(i) for i in b.index.tolist())
            yield b

    def write(self, epoch: int, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "index": self.seen}) + "\n")
        self.seen = []
