"""Throughput benchmarks (python -m benchmarks; see benchmarks/__main__.py) and the facts they record."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(dist: str) -> str | None:
    """An installed distribution's version from its metadata (ffcv's own __version__ is stale), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    """What every benchmark's JSON records of where it ran: CPU, cores, GPU, library versions, date, load."""
    import numba
    import numpy
    import torch

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "numba": numba.__version__, "numpy": numpy.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "loadavg": os.getloadavg(),
            "torchvision": package_version("torchvision"), "accelerate": package_version("accelerate"),
            "dali": package_version("nvidia-dali-cuda130"), "ffcv": package_version("ffcv")}


def mean_std(rows: list[dict], keys: tuple[str, ...], figures: tuple[str, ...]) -> list[dict]:
    """One row per distinct value of ``keys`` (in first-seen order): "seeds", and the mean and std (0 for
    a single run) of every figure as f and f + "_std"."""
    import statistics

    out = []
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        rs = [r for r in rows if tuple(r[k] for k in keys) == key]
        row = {**dict(zip(keys, key)), "seeds": [r["seed"] for r in rs]}
        for f in figures:
            values = [r[f] for r in rs]
            row[f] = statistics.mean(values)
            row[f + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def spread(values) -> dict:
    """{"min", "median", "max"} of repeated measurements: the noise every figure is reported with."""
    import statistics

    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def there_and_back(items: list, repeats: int) -> list[tuple]:
    """[(item, n)]: the order in which benchmark rows are timed, each n repeats: every item forward with
    ceil(repeats / 2), then backward with the rest. Each row's samples then span the whole run, so slow
    drift of a shared machine shows in its min-max and cancels, to first order, in its median."""
    first = (repeats + 1) // 2
    order = [(it, first) for it in items]
    if repeats > first:
        order += [(it, repeats - first) for it in reversed(items)]
    return order


def data_root(data: str, images: int, cores: int, cache: Path = Path("bench-out") / "data") -> Path:
    """The loaders' JPEG set: `data` when given (ImageFolder layout with train/, else DataError), or the
    generated ImageNet-like set of `images` files (benchmarks/imagenet_like.py), cached in `cache`."""
    from benchmarks import imagenet_like
    from loaders.folder import DataError

    if data:
        if not (Path(data) / "train").is_dir():
            raise DataError(f"--data {data}: no train/ folder in it (ImageFolder layout: DIR/train/<class>/*.jpg, "
                            "DIR/val/...)")
        return Path(data)
    return imagenet_like.ensure(Path(cache) / f"imagenet-like-{images}", images, workers=cores)


def run_cli(main) -> None:
    """sys.exit(main()) for a benchmark command; bad data (DataError) ends it with one line, not a traceback."""
    from loaders.folder import DataError

    try:
        sys.exit(main())
    except DataError as e:
        sys.exit(f"error: {e}")


def write_section(path: str | Path, markers: tuple[str, str], text: str) -> None:
    """Replace what lies between the two marker lines of a generated section (README.md, docs/*.md) by text."""
    path = Path(path)
    doc = path.read_text()
    if markers[0] not in doc or markers[1] not in doc:
        raise SystemExit(f"error: {path} has no {markers[0]} ... {markers[1]} section")
    start, end = doc.index(markers[0]) + len(markers[0]), doc.index(markers[1])
    path.write_text(doc[:start] + "\n" + text + doc[end:])
