"""Every throughput figure in one command: loaders, the fused kernel, the training step.

    python -m benchmarks [--out DIR] [--quick] [--device cpu|cuda] [--arch resnet18 --size 96 ...]
    make bench            (make bench QUICK=1: the CI smoke variant)

Runs, one after another in this process on the same machine and data:
1. loaders (benchmarks/loaders.py): two-view images/s of every installed backend (torchvision, DALI,
   FFCV jpg / jpg decoded per view / raw), MixMask off and on, after a warm-up epoch, median of
   epochs, per core, ratio to the torchvision baseline; on a generated ImageNet-like JPEG set
   (cached in bench-out/);
2. kernel (benchmarks/kernels.py): the fused normalise + mix against a copy of the same bytes and the
   torch ops (CPU; CUDA rows too on a GPU);
3. training (benchmarks/training.py): images/s of the MoCo v2 + MixMask step fed from synthetic
   device tensors (the model-only ceiling), with masking off (plain MoCo v2), and fed from each loader:
   the share of the ceiling is what the input pipeline leaves of the step's speed.
Writes DIR/bench.json (machine, versions, date, every figure) and DIR/bench.png (bar charts), and
prints the tables.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

from benchmarks import cpu_model, package_version


def installed_backends() -> list[str]:
    names = ["torchvision"]
    if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
        names.append("dali")
    if importlib.util.find_spec("ffcv"):
        names += ["ffcv-jpg", "ffcv-jpg-twice", "ffcv-raw"]
    return names


def machine() -> dict:
    import numba
    import numpy
    import torch

    info = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "numba": numba.__version__, "numpy": numpy.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "loadavg": os.getloadavg(),
            "dali": package_version("nvidia-dali-cuda130"), "ffcv": package_version("ffcv")}
    return info


def chart(result: dict, path: Path) -> None:
    """Two bar charts: loader images/s (MixMask off/on) and training-step images/s by feed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["loaders"]
    names = list(dict.fromkeys(r["backend"] for r in rows))
    w = 0.38
    for k, mask in enumerate((False, True)):
        vals = [next(r["images_per_sec"] for r in rows if r["backend"] == n and r["mixmask"] == mask) for n in names]
        bars = a.bar([i + (k - 0.5) * w for i in range(len(names))], vals, w, label=f"MixMask {'on' if mask else 'off'}")
        a.bar_label(bars, fmt="%.0f", fontsize=7)
    a.set_xticks(range(len(names)), names, rotation=20, ha="right")
    a.set_ylabel("two-view images / s")
    a.set_title(f"loaders ({result['machine']['cores']} cores, {result['args']['size']} px views)")
    a.legend()
    t = result["training"]
    labels = [f"{r['feed']}{'' if r['mixmask'] else ' (no mask)'}" for r in t]
    bars = b.bar(range(len(t)), [r["images_per_sec"] for r in t],
                 color=["#555" if r["feed"] == "synthetic" else "#2a7" for r in t])
    b.bar_label(bars, labels=[f"{r['images_per_sec']:.0f}\n{r['share_of_ceiling']:.2f}x" for r in t], fontsize=7)
    b.set_xticks(range(len(t)), labels, rotation=20, ha="right")
    b.set_ylim(0, 1.2 * max(r["images_per_sec"] for r in t))
    a.set_ylim(0, 1.12 * max(r["images_per_sec"] for r in rows))
    b.set_ylabel("training images / s")
    a_ = result["args"]
    b.set_title(f"MoCo v2 + MixMask step ({a_['arch']}, {a_['train_size']} px, batch {a_['train_batch']}); "
                "x = share of ceiling", fontsize=9)
    fig.suptitle(f"mixmask benchmarks, {result['machine']['date'][:10]}, {result['machine']['cpu']}"
                 + (f", {result['machine']['gpu']}" if result["machine"]["gpu"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=512, help="generated JPEGs for the loaders")
    ap.add_argument("--size", type=int, default=224, help="loader view side (px)")
    ap.add_argument("--batch", type=int, default=64, help="loader batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per loader row")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--arch", default="resnet18", help="training benchmark backbone")
    ap.add_argument("--train-size", type=int, default=96, help="training benchmark view side (px)")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per repeat")
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--kernel-n", type=int, default=256, help="kernel benchmark batch (224 px)")
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.size, a.batch, a.repeats = 64, 64, 16, 1
        a.arch, a.train_size, a.train_batch, a.steps, a.kernel_n = "resnet10", 32, 8, 2, 4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backends = installed_backends()

    from benchmarks import kernels, loaders, training

    print("== loaders", flush=True)
    lj = out / "loaders.json"
    loaders.main(["--json", str(lj), "--images", str(a.images), "--size", str(a.size), "--batch", str(a.batch),
                  "--repeats", str(a.repeats), "--cores", str(a.cores), "--backends", ",".join(backends),
                  "--device", a.device])
    print("== kernel", flush=True)
    kj = out / "kernels.json"
    kargs = ["--json", str(kj), "--n", str(a.kernel_n), "--repeats", "3" if a.quick else "5", "--torch-repeats", "1"]
    kernels.main(kargs + (["--size", "32"] if a.quick else []))
    print("== training", flush=True)
    targs = argparse.Namespace(arch=a.arch, size=a.train_size, batch=a.train_batch, steps=a.steps,
                               warmup=1 if a.quick else 2, repeats=1 if a.quick else 3, precision=a.precision,
                               backends=",".join(b for b in backends if b in ("torchvision", "dali", "ffcv-jpg")),
                               device=a.device, cores=a.cores)
    root = loaders.make_dataset(Path("bench-out") / f"jpegs-{a.images}", a.images)
    train_rows = training.run(targs, root)
    training.print_rows(train_rows, targs)
    result = {"machine": machine(), "args": vars(a), "loaders": json.loads(lj.read_text())["results"],
              "kernels": json.loads(kj.read_text())["results"], "training": train_rows}
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    chart(result, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
