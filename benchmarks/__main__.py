"""Every throughput figure in one command: loaders, the fused kernel, the training step.

    python -m benchmarks [--out DIR] [--quick] [--device cpu|cuda] [--arch resnet18 --size 96 ...]
    make bench            (make bench QUICK=1: the CI smoke variant)

Runs, one after another in this process on the same machine and data:
1. loaders (benchmarks/loaders.py): two-view images/s of every installed backend (torchvision, DALI,
   FFCV jpg / jpg decoded per view / raw), MixMask off and on, after a warm-up epoch, median of
   epochs (with min and max), per core, ratio to the torchvision baseline; on a generated ImageNet-like
   JPEG set (benchmarks/imagenet_like.py, cached in bench-out/data/ or --cache DIR);
2. kernel (benchmarks/kernels.py): the fused normalise + mix against a copy of the same bytes and the
   torch ops (CPU; CUDA rows too on a GPU), timed in three bursts (before the loaders, after them,
   after the training rows) whose rounds are pooled, so its min-max covers the drift of the machine's
   memory bandwidth over the run, not only the few seconds of one burst;
3. training (benchmarks/training.py): images/s of the MoCo v2 + MixMask step fed from synthetic
   device tensors (the model-only ceiling), with masking off (plain MoCo v2), and fed from each loader:
   the share of the ceiling is what the input pipeline leaves of the step's speed.
Every figure is a median with the min and max of its repeats. Writes DIR/bench.json (machine, versions,
date, the data set, every figure) and DIR/bench.png (bar charts with min-max whiskers), and prints the
tables; the previous DIR/bench.json becomes DIR/bench-prev.json and, when it was run with the same
options, each figure is compared with it (benchmarks/report.py: do the min-max ranges overlap?).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

from benchmarks import data_root, machine, run_cli

TARGET_SHARE = 0.95  # on a GPU the best loader keeps the step at >= 95% of the synthetic-feed ceiling


def installed_backends() -> list[str]:
    names = ["torchvision"]
    if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
        names.append("dali")
    if importlib.util.find_spec("ffcv"):
        names += ["ffcv-jpg", "ffcv-jpg-twice", "ffcv-raw"]
    return names


def _options(result: dict) -> dict:
    """A run's options that bear on its figures (where the generated set is cached does not)."""
    return {k: v for k, v in result.get("args", {}).items() if k != "cache"}


def _errbars(rows: list[dict]):
    """matplotlib yerr (2, n) from rows' median images_per_sec and min/max."""
    return [[r["images_per_sec"] - r.get("min", r["images_per_sec"]) for r in rows],
            [r.get("max", r["images_per_sec"]) - r["images_per_sec"] for r in rows]]


def chart(result: dict, path: Path) -> None:
    """Three bar charts with min-max whiskers: loader images/s (MixMask off/on), training-step images/s
    by feed (labelled with the share of the ceiling), and the fused kernel against a copy per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [5, 6, 2.2]})
    rows = result["loaders"]
    names = list(dict.fromkeys(r["backend"] for r in rows))
    w = 0.38
    for k, mask in enumerate((False, True)):
        sel = [next(r for r in rows if r["backend"] == n and r["mixmask"] == mask) for n in names]
        bars = a.bar([i + (k - 0.5) * w for i in range(len(names))], [r["images_per_sec"] for r in sel], w,
                     yerr=_errbars(sel), capsize=3, label=f"MixMask {'on' if mask else 'off'}")
        a.bar_label(bars, fmt="%.0f", fontsize=7, padding=2, label_type="center")
    a.set_xticks(range(len(names)), names, rotation=20, ha="right")
    a.set_ylabel("two-view images / s (median, min-max)")
    d = result.get("dataset")
    a.set_title(f"loaders: {result['machine']['cores']} cores, {result['args']['size']} px views"
                + (f", {d['files']} JPEGs ~{d['mean_kb']:.0f} KB" if d else ""), fontsize=10)
    a.legend(loc="upper left")
    a.set_ylim(0, 1.15 * max(r.get("max", r["images_per_sec"]) for r in rows))
    t = result["training"]
    labels = [f"{r['feed']}\n{r.get('variant', 'mixmask' if r['mixmask'] else 'plain')}" for r in t]
    bars = b.bar(range(len(t)), [r["images_per_sec"] for r in t], yerr=_errbars(t), capsize=3,
                 color=["#555" if r["feed"] == "synthetic" else "#2a7" for r in t])
    b.bar_label(bars, labels=[f"{r['images_per_sec']:.0f}\n{r['share_of_ceiling']:.2f}x" for r in t], fontsize=7,
                label_type="center", color="white")
    b.set_xticks(range(len(t)), labels, rotation=20, ha="right")
    b.set_ylim(0, 1.15 * max(r.get("max", r["images_per_sec"]) for r in t))
    b.set_ylabel("training images / s (median, min-max)")
    a_ = result["args"]
    b.set_title(f"MoCo v2 + MixMask step: {a_['arch']}, {a_['train_size']} px, batch {a_['train_batch']}, "
                f"{'fp32' if a_['precision'] == 'no' else a_['precision']}\nlabel: img/s and share of the synthetic-feed ceiling", fontsize=9)
    ks = [r for r in result["kernels"] if r.get("variant", "vector") == "vector"]
    ks = [r for r in ks if r["backend"] == ks[-1]["backend"]]  # the GPU's rows when there are any
    x = range(len(ks))
    c.bar([i - 0.2 for i in x], [r["fused_gbps"] for r in ks], 0.4, label="fused kernel")
    c.bar([i + 0.2 for i in x], [r["copy_gbps"] for r in ks], 0.4, label="copy, same bytes", color="#aaa")
    for i, r in enumerate(ks):
        c.text(i - 0.2, r["fused_gbps"], f"{r['fused_over_copy']:.2f}", ha="center", va="bottom", fontsize=7)
    c.set_xticks(list(x), [r["dtype"] for r in ks])
    c.set_ylabel("GB/s")
    c.set_ylim(0, 1.2 * max(max(r["fused_gbps"], r["copy_gbps"]) for r in ks))
    c.set_title(f"fused normalise + mix ({ks[0]['backend'].upper()})\nlabel: share of a copy", fontsize=9)
    c.legend(fontsize=7, loc="upper right")
    m = result["machine"]
    fig.suptitle(f"mixmask benchmarks, {m['date'][:10]}, {m['cores']} cores {m['cpu']}"
                 + (f", {m['gpu']}" if m["gpu"] else ", no GPU"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default="", help="JPEG set in ImageFolder layout (default: the generated "
                    "ImageNet-like set of --images files, cached in --cache)")
    ap.add_argument("--cache", default="bench-out/data", help="folder for the generated JPEG set and its .beton files")
    ap.add_argument("--images", type=int, default=1024, help="generated JPEGs for the loaders")
    ap.add_argument("--size", type=int, default=224, help="loader view side (px)")
    ap.add_argument("--batch", type=int, default=64, help="loader batch")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per loader row")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--arch", default="resnet18", help="training benchmark backbone")
    ap.add_argument("--train-size", type=int, default=96, help="training benchmark view side (px)")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per run")
    ap.add_argument("--train-repeats", type=int, default=5, help="timed runs per training row")
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--variants", help="training-step variants (benchmarks/training.py; default: all but cudagraphs, "
                    "--quick: mixmask,plain,mixmask+batch_views)")
    ap.add_argument("--epoch-sizes", help="demo-epoch rows: view sizes ('' = none; CPU only; default 24,32, --quick: none)")
    ap.add_argument("--kernel-n", type=int, default=256, help="kernel benchmark batch (224 px)")
    a = ap.parse_args(argv)
    from benchmarks import kernels, loaders, report, training

    if a.quick:
        a.images, a.size, a.batch, a.repeats = 64, 64, 16, 2
        a.arch, a.train_size, a.train_batch, a.steps, a.train_repeats, a.kernel_n = "resnet10", 32, 8, 2, 2, 4
    if a.variants is None:  # compiling takes minutes on 2 cores: not in the quick variant unless asked for
        a.variants = "mixmask,plain,mixmask+batch_views" if a.quick else training.ALL_VARIANTS
    if a.epoch_sizes is None:
        a.epoch_sizes = "" if a.quick else "24,32"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backends = installed_backends()

    root = data_root(a.data, a.images, a.cores, Path(a.cache))
    ksize, kreps = (32, 3) if a.quick else (224, 7)
    dtypes = ["float16", "bfloat16", "float32"]
    kdevice = kernels._device_info()
    print("== kernel, burst 1 of 3 (the kernel is timed at the start, middle and end of the run)", flush=True)
    bursts = [kernels.measure(a.kernel_n, ksize, dtypes, kreps, 0)]
    print("== loaders", flush=True)
    lj = out / "loaders.json"
    loaders.main(["--json", str(lj), "--data", str(root), "--size", str(a.size), "--batch", str(a.batch),
                  "--repeats", str(a.repeats), "--cores", str(a.cores), "--backends", ",".join(backends),
                  "--device", a.device])
    print("== kernel, burst 2 of 3 (and the torch reference)", flush=True)
    bursts.append(kernels.measure(a.kernel_n, ksize, dtypes, kreps, 1))
    print("== training", flush=True)
    targs = argparse.Namespace(arch=a.arch, size=a.train_size, batch=a.train_batch, steps=a.steps,
                               warmup=1 if a.quick else 2, repeats=a.train_repeats, precision=a.precision,
                               variants=a.variants,
                               backends=",".join(b for b in backends if b in ("torchvision", "dali", "ffcv-jpg")),
                               device=a.device, cores=a.cores)
    train_rows = training.run(targs, root)
    training.print_rows(train_rows, targs)
    epochs = []
    if a.epoch_sizes and a.device == "cpu":
        print("== demo epochs by view size (progressive resolution)", flush=True)
        epochs = training.epoch_rows([int(s) for s in a.epoch_sizes.split(",")], a.train_repeats, 64, a.cores,
                                     a.device, a.precision)
        training.print_epochs(epochs)
    print("== kernel, burst 3 of 3", flush=True)
    bursts.append(kernels.measure(a.kernel_n, ksize, dtypes, kreps, 0))
    kernel_rows = kernels.merge_bursts(bursts)
    kdevice["loadavg_end"] = os.getloadavg()
    kernels.print_rows(kernel_rows, a.kernel_n, ksize, kdevice)
    lres = json.loads(lj.read_text())
    best = max((r for r in train_rows if r["feed"] != "synthetic"), key=lambda r: r["share_of_ceiling"], default=None)
    if best:
        print(f"best loader: {best['feed']} ({best['variant']}) keeps the training step at {best['share_of_ceiling']:.2f} of its "
              f"model-only ceiling (target on a GPU: >= {TARGET_SHARE})")
    result = {"machine": machine(), "args": vars(a), "dataset": lres["dataset"], "loaders": lres["results"],
              "kernels": kernel_rows, "training": train_rows, "epochs": epochs,
              "best_loader": {"feed": best["feed"], "variant": best["variant"], "share_of_ceiling": best["share_of_ceiling"],
                              "target": TARGET_SHARE} if best else None}
    path = out / "bench.json"
    if path.exists():  # the previous run, kept for the comparison below
        path.replace(out / "bench-prev.json")
    path.write_text(json.dumps(result, indent=2))
    chart(result, out / "bench.png")
    prev = out / "bench-prev.json"
    if prev.exists():
        old = json.loads(prev.read_text())
        if _options(old) == _options(result) and old["machine"].get("cores") == result["machine"]["cores"]:
            print(f"== against the previous run with the same options ({old['machine']['date']}, {prev})")
            report.print_comparison(report.compare(old, result), "previous", "this run")
    print(f"wrote {path} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
