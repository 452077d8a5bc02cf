"""Training-step throughput of MoCo v2 + MixMask: the engine's own step, fed from synthetic device tensors
and from each loader, with each step option on and off; and one demo-scale epoch per view size.

    python -m benchmarks.training --json PATH [--arch resnet18 --size 96 --batch 32 --steps 8 ...]
                                  [--variants mixmask,plain,mixmask+batch_views,mixmask+compile,...]
                                  [--epoch-sizes 24,32]

Step rows. A variant is MixMask on ("mixmask") or off ("plain") plus step options, joined by "+":
  batch_views  one forward of x1 and the mixed view with BatchNorm statistics per view (model.batch_views)
  compile      torch.compile of the encoders (model.compile=default)
  cudagraphs   torch.compile with CUDA graphs (model.compile=reduce-overhead; GPU only)
The model is built as train.py builds it (train.build_model from a Config, the same compile path), and
every step is mixmask.engine.train_step under an Accelerator (autocast as in a run, no per-step host sync)
followed by the framework's after_step. Feeds:
- synthetic: one Batch made once on the device by the stage and fed every step: the model-only ceiling of
  that variant;
- each backend (torchvision, dali, ffcv-jpg): batches from the real loader (decode, two views, fused mix),
  with the "mixmask" variant and with the fastest MixMask variant on the synthetic feed;
  share_of_ceiling = its images/s / the synthetic images/s of the same variant: 1.0 = the model never waits.
images/s = batch x timed steps / wall time (the device synchronised at both ends), after warm-up steps
(compilation, worker start); the median of --repeats runs with their min and max. Rows are timed there and
back (benchmarks.there_and_back), with a fresh loader each time and one model per variant, built on first
use and kept for all its rows (a compiled model compiles once). first_step_s: the variant's first step
(compilation included). host_ms, the host's time per step outside the device work:
on a GPU the time to issue a step (from a synchronised start until the step's Python returns; the GPU works
asynchronously) against the step's wall time (step_ms); on the CPU, where host and device are one, the
step's wall time minus the self time of the ATen operators under torch.profiler (the Python, dispatch and
optimizer bookkeeping around the kernels; the profiler's own cost included), not given for compiled
variants (inductor's fused CPU kernels are not profiler events).

Epoch rows (--epoch-sizes): progressive resolution's effect on a demo-scale epoch: one whole epoch of the
embedded demo set (5000 images) of the demo recipe (`make train`'s configs: MoCo v2 + MixMask, ResNet-10
small stem, 8-px cells, batch 64) through its torchvision loader at each view size; seconds per epoch,
median (min-max) of --epoch-repeats. `--variants '' --backends ''` runs these rows alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import data_root, run_cli, spread, there_and_back

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPTIONS = ("batch_views", "compile", "cudagraphs")
ALL_VARIANTS = "mixmask,plain,mixmask+batch_views,mixmask+compile,mixmask+compile+batch_views"  # cudagraphs: GPU


def parse_variant(variant: str) -> dict:
    """'mixmask+compile+batch_views' -> {"mixmask": True, "batch_views": True, "compile": "default"}."""
    head, *opts = variant.split("+")
    if head not in ("mixmask", "plain") or any(o not in OPTIONS for o in opts):
        raise SystemExit(f"error: variant {variant!r}: mixmask|plain followed by +option, options {', '.join(OPTIONS)}")
    compile_mode = "reduce-overhead" if "cudagraphs" in opts else "default" if "compile" in opts else "none"
    return {"mixmask": head == "mixmask", "batch_views": "batch_views" in opts, "compile": compile_mode}


def grid_for(size: int) -> int:
    """The MixMask grid of the benchmark's views: 8 cells (the ImageNet recipe) from 64 px, else 4."""
    return 8 if size >= 64 else 4


def build_model(arch: str, size: int, device: torch.device, variant: str):
    """MoCo v2 (a 512-wide projector, queue 4096, m 0.99, one process) as train.py builds it, channels_last."""
    import train
    from mixmask.config import load_config

    v = parse_variant(variant)
    cfg = load_config([], [f"model.arch={arch}", f"model.stem={'small' if size <= 64 else 'imagenet'}",
                           f"data.image_size={size}", f"mask.grid={grid_for(size)}", "moco_v2.mlp_hidden=512",
                           "moco_v2.queue=4096", "moco_v2.momentum=0.99", "moco_v2.bn_splits=1",
                           f"model.batch_views={str(v['batch_views']).lower()}", f"model.compile={v['compile']}"])
    model = train.build_model(cfg, 1).to(device).to(memory_format=torch.channels_last)
    return train.compile_model(cfg, model)


def synthetic_batches(batch: int, size: int, device, dtype, mask: bool):
    """The same Batch every step, made once by the device stage from random uint8 views."""
    from mixmask.mixing import MixMask, MixStage

    g = torch.Generator().manual_seed(0)
    v1 = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device)
    v2 = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device)
    stage = MixStage(MEAN, STD, dtype=dtype, channels_last=True, mixer=MixMask(grid=grid_for(size)) if mask else None)
    b = stage(v1, v2, torch.zeros(batch, dtype=torch.long, device=device), None, 0, 0)
    while True:
        yield b


def loader_batches(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """The engine's optimizer step on a prepared model: train_step + after_step, as fit runs them."""

    def __init__(self, accelerator, model):
        from mixmask.engine import train_step

        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.model, self.opt = accelerator.prepare(model, self.opt)
        self.acc, self.net, self.train_step, self.k = accelerator, accelerator.unwrap_model(self.model), train_step, 0
        self.model.train()

    def __call__(self, batches) -> tuple[dict, int]:
        parts, n = self.train_step(self.acc, self.model, self.opt, batches)
        self.k += 1
        self.net.after_step(self.k, 10**6)
        return parts, n


def time_steps(step: Stepper, batches, steps: int, warmup: int, device) -> tuple[float, float]:
    """(images/s of `steps` steps after `warmup`, seconds of the first warm-up step)."""
    first = 0.0
    for i in range(warmup):
        t = time.perf_counter()
        parts, _ = step(batches)
        if i == 0:
            parts["loss"].item()
            first = time.perf_counter() - t
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        parts, k = step(batches)
        n += k
    parts["loss"].item()  # waits for the last step
    return n / (time.perf_counter() - t0), first


def host_ms(step: Stepper, batches, steps: int, device) -> tuple[float, float]:
    """(host ms per step outside the device work, wall ms per step): see the module docstring."""
    if device.type == "cuda":
        issue, wall = [], []
        for _ in range(steps):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            step(batches)
            issue.append(time.perf_counter() - t)
            torch.cuda.synchronize(device)
            wall.append(time.perf_counter() - t)
        return 1e3 * sorted(issue)[len(issue) // 2], 1e3 * sorted(wall)[len(wall) // 2]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            parts, _ = step(batches)
        parts["loss"].item()
        wall = time.perf_counter() - t
    aten_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::"))
    return max(0.0, 1e3 * wall - aten_us / 1e3) / steps, 1e3 * wall / steps


def make_accelerator(device: torch.device, precision: str):
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def measure(rows_to_time: list[tuple[str, str]], args, root: Path | None, steppers: "Steppers", device, dtype,
            runs: dict, extra: dict) -> None:
    """Time every (feed, variant) there and back; fills runs[(feed, variant)] with images/s and extra with
    first_step_s (the variant's first step), host_ms and step_ms (once per row, after its first timed run)."""
    from benchmarks.loaders import build

    for (feed, variant), n in there_and_back(rows_to_time, args.repeats):
        v, loader = parse_variant(variant), None
        if feed == "synthetic":
            batches = synthetic_batches(args.batch, args.size, device, dtype, v["mixmask"])
        else:
            loader = build(feed, root, args.size, args.batch, args.cores, v["mixmask"], args.device)
            loader.stage.dtype = dtype
            batches = loader_batches(loader)
        step, key = steppers.get(variant), (feed, variant)
        for r in range(n):
            ips, first = time_steps(step, batches, args.steps, args.warmup if r == 0 else 1, device)
            runs.setdefault(key, []).append(ips)
            if key not in extra:
                h, w = host_ms(step, batches, max(2, args.steps // 2), device)
                measurable = device.type == "cuda" or v["compile"] == "none"
                extra[key] = {"first_step_s": steppers.first.setdefault(variant, first),
                              "host_ms": h if measurable else None, "step_ms": w}
        batches.close()  # stop the loader's iteration, then free its threads before the next row
        if hasattr(loader, "close"):
            loader.close()


class Steppers:
    """One prepared model per variant, built on first use and reused by every row of that variant (a
    compiled model compiles once per run, not once per row)."""

    def __init__(self, accelerator, arch: str, size: int, device: torch.device):
        self.acc, self.arch, self.size, self.device = accelerator, arch, size, device
        self.steps: dict[str, Stepper] = {}
        self.first: dict[str, float] = {}

    def get(self, variant: str) -> Stepper:
        if variant not in self.steps:
            self.steps[variant] = Stepper(self.acc, build_model(self.arch, self.size, self.device, variant))
        return self.steps[variant]


def run(args, root: Path | None = None) -> list[dict]:
    """The step rows: every variant on the synthetic feed, then each backend with "mixmask" and the fastest
    MixMask variant; each with its share of the same variant's synthetic ceiling."""
    device = torch.device(args.device)
    from train import DTYPES

    dtype = DTYPES[args.precision]
    accelerator = make_accelerator(device, args.precision)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    runs: dict[tuple, list[float]] = {}
    extra: dict[tuple, dict] = {}
    steppers = Steppers(accelerator, args.arch, args.size, device)
    measure([("synthetic", v) for v in variants], args, root, steppers, device, dtype, runs, extra)
    med = {v: spread(runs[("synthetic", v)])["median"] for v in variants}
    masked = [v for v in variants if parse_variant(v)["mixmask"]]
    fastest = max(masked, key=med.get) if masked else None
    fed = []
    if root is not None and fastest:
        fed = [(b, v) for b in args.backends.split(",") if b for v in dict.fromkeys(
            [x for x in ("mixmask", fastest) if x in variants])]
        measure(fed, args, root, steppers, device, dtype, runs, extra)
    del steppers
    accelerator.free_memory()
    rows = []
    for feed, variant in [("synthetic", v) for v in variants] + fed:
        s, v = spread(runs[(feed, variant)]), parse_variant(variant)
        rows.append({"feed": feed, "variant": variant, "mixmask": v["mixmask"], "options": v,
                     "images_per_sec": s["median"], "min": s["min"], "max": s["max"], "runs": runs[(feed, variant)],
                     "share_of_ceiling": s["median"] / med[variant], **extra[(feed, variant)]})
    return rows


def epoch_rows(sizes: list[int], repeats: int, batch: int, cores: int, device: str, precision: str,
               max_batches: int = 0) -> list[dict]:
    """Seconds for one epoch of the demo set at each view size: the demo recipe (train.default_configs: MoCo v2
    + MixMask, ResNet-10 small stem, 8-px cells) at data.image_size = size, its torchvision training loader as
    train.py builds it, and the engine's step; max_batches > 0 times only that many batches of each epoch (tests)."""
    import train
    from loaders.demo import ensure_demo_dataset
    from loaders.folder import index_split
    from mixmask.config import load_config

    dev, root = torch.device(device), ensure_demo_dataset()
    accelerator = make_accelerator(dev, precision)
    index = index_split(root, "train")
    secs: dict[int, list[float]] = {}
    images = {}
    for size, n in there_and_back(sizes, repeats):
        overrides = [f"data.image_size={size}", f"mask.grid={size // 8}", f"data.batch_size={batch}",
                     f"data.workers={cores}", "data.backend=torchvision", "data.timeout=0"]
        cfg = load_config(train.default_configs(overrides), overrides)
        loader = train.train_loader(cfg, accelerator, index, train.pretrain_aug(cfg))
        model = train.build_model(cfg, 1).to(dev).to(memory_format=torch.channels_last)
        step = Stepper(accelerator, model)
        for r in range(n):
            loader.set_epoch(r)
            batches, k = iter(loader), 0
            t = time.perf_counter()
            for _ in range(min(len(loader), max_batches or len(loader))):
                parts, m = step(batches)
                k += m
            parts["loss"].item()
            secs.setdefault(size, []).append(time.perf_counter() - t)
            images[size] = k
            del batches
        if hasattr(loader, "close"):
            loader.close()
        del step
        accelerator.free_memory()
    out = []
    for size in sizes:
        s = spread(secs[size])
        out.append({"size": size, "epoch_s": s["median"], "min": s["min"], "max": s["max"], "runs": secs[size],
                    "images": images[size], "images_per_sec": images[size] / s["median"],
                    "vs_full": s["median"] / spread(secs[max(sizes)])["median"]})
    return out


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=96, help="view side (px)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--backends", default="torchvision,dali,ffcv-jpg", help="loaders to feed the step ('' = none)")
    ap.add_argument("--variants", default=ALL_VARIANTS,
                    help="step variants on the synthetic feed (the first MixMask one and the fastest also feed the loaders)")


def print_rows(rows: list[dict], args) -> None:
    print(f"training step: MoCo v2 {args.arch} at {args.size} px, batch {args.batch}, {args.precision}, "
          f"{args.device}; median (min-max) of {args.repeats} x {args.steps} steps")
    print(f"{'feed':12} {'variant':30} {'img/s':>8} {'min-max':>15} {'share':>6} {'host ms':>8} {'step ms':>8} "
          f"{'1st step s':>10}")
    for r in rows:
        print(f"{r['feed']:12} {r['variant']:30} {r['images_per_sec']:8.1f} {r['min']:7.1f}-{r['max']:<7.1f} "
              f"{r['share_of_ceiling']:6.2f} {_ms(r['host_ms']):>8} {r['step_ms']:8.1f} {r['first_step_s']:10.1f}")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_epochs(rows: list[dict]) -> None:
    print(f"demo epoch ({rows[0]['images']} images, torchvision loader + ResNet-10 step) by view size:")
    for r in rows:
        print(f"  {r['size']:4d} px  {r['epoch_s']:6.1f} s ({r['min']:.1f}-{r['max']:.1f})  {r['images_per_sec']:6.0f} img/s"
              f"  {r['vs_full']:.2f} of the full size's epoch")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--epoch-sizes", default="", help="view sizes for the demo-epoch rows, e.g. 24,32 ('' = none)")
    ap.add_argument("--epoch-repeats", type=int, default=3)
    add_args(ap)
    a = ap.parse_args(argv)
    from benchmarks import machine

    root = data_root("", a.images, a.cores) if a.backends else None
    rows = run(a, root)
    print_rows(rows, a)
    result = {"machine": machine(), "args": vars(a), "results": rows}
    if a.epoch_sizes:
        result["epochs"] = epoch_rows([int(s) for s in a.epoch_sizes.split(",")], a.epoch_repeats, 64, a.cores,
                                      a.device, a.precision)
        print_epochs(result["epochs"])
    Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
