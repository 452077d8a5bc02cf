"""Helpers for tests that run train.py end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "data.image_size=32",
    "data.batch_size=16",
    "data.workers=0",
    "model.arch=resnet10",
    "moco_v2.queue=64",
    "moco_v2.mlp_hidden=64",
    "mask.grid=4",
    "optim.epochs=2",
    "run.knn_every=0",
    "run.knn_k=10",
    "run.log_every=1",
    "run.progress=false",
]


def run_train(*args: str, cwd: Path = REPO, timeout: int = 600, launcher: list[str] | None = None):
    """Run train.py (optionally under a launcher) and return the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + [str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
