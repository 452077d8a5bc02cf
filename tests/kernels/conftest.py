"""Fixtures for the kernels/ tests: backends to run a CPU kernel with, and a subprocess runner.

Every CPU kernel test runs twice: compiled ("njit") and as plain Python ("python", the
dispatcher's py_func, i.e. what NUMBA_DISABLE_JIT=1 does for that kernel); test_kernels_nojit.py
additionally runs everything with NUMBA_DISABLE_JIT=1 in a fresh process, and
test_kernels_cudasim.py runs the CUDA kernels under NUMBA_ENABLE_CUDASIM=1 in a fresh process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # repository root (holds kernels/)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (numba.cuda and torch.cuda); skipped otherwise")


@pytest.fixture(params=["njit", "python"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def run_python():
    """run_python(code or Path, env_extra, stdin=None, timeout=300) -> CompletedProcess."""
    return _run_python


def _run_python(code_or_file: str | Path, env_extra: dict[str, str], args=(), timeout: float = 300,
                stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run Python code (a string) or a script (a Path) in a fresh interpreter at the repo root."""
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if isinstance(code_or_file, Path):
        cmd = [sys.executable, str(code_or_file)]
    else:
        cmd = [sys.executable, "-c", code_or_file]
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin)
