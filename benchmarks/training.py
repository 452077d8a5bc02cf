"""Training-step throughput of MoCo v2 + MixMask, from synthetic device tensors and from each loader.

    python -m benchmarks.training --json PATH [--arch resnet18 --size 96 --batch 32 --steps 8 ...]

Rows (same model, optimizer and step as mixmask/engine.py: forward of x1 and the mixed view, momentum
keys of x2, MixMask loss, backward, SGD step, loss.item() to synchronise):
- synthetic, MixMask on: one Batch made once on the device and fed every step: the model-only ceiling;
- synthetic, MixMask off: plain MoCo v2 (no mixed forward): the cost of MixMask's extra forward;
- each backend, MixMask on: batches from the real loader (decode, two views, fused mix);
  share_of_ceiling = its images/s / the ceiling's: 1.0 means the model never waits for data.
images/s = batch x timed steps / wall time, after warm-up steps (compilation, worker start); the median
of --repeats such runs, with their min and max (the noise). Rows are timed there and back (half the runs
of every row, then the rest in reverse order; benchmarks.there_and_back), each time with a fresh model
and loader.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import data_root, run_cli, spread, there_and_back

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _model(arch: str, size: int, device, channels_last: bool):
    from mixmask.frameworks.moco_v2 import MoCoV2, MoCoV2Config

    stem = "small" if size <= 64 else "imagenet"
    m = MoCoV2(MoCoV2Config(mlp_hidden=512, queue=4096, momentum=0.99, bn_splits=1), arch=arch, stem=stem).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def time_steps(model, batches, steps: int, warmup: int, device, dtype) -> float:
    """images/s of `steps` training steps after `warmup` (batches: an iterator of Batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    n, t0 = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
            n = 0
        b = next(batches)
        with autocast:
            out = model(b)
        out["loss"].backward()
        opt.step()
        model.after_step(i + 1, warmup + steps)
        opt.zero_grad(set_to_none=True)
        out["loss"].item()
        n += b.x1.shape[0]
    return n / (time.perf_counter() - t0)


def synthetic_batches(batch: int, size: int, device, dtype, mask: bool, channels_last: bool):
    """The same Batch every step, made once by the device stage from random uint8 views."""
    from mixmask.mixing import MixMask, MixStage

    g = torch.Generator().manual_seed(0)
    v1 = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device)
    v2 = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device)
    stage = MixStage(MEAN, STD, dtype=dtype, channels_last=channels_last, mixer=MixMask(grid=8 if size >= 64 else 4) if mask else None)
    b = stage(v1, v2, torch.zeros(batch, dtype=torch.long, device=device), None, 0, 0)
    while True:
        yield b


def loader_batches(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run(args, root: Path | None = None) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    feeds = [("synthetic", True), ("synthetic", False)]
    if root is not None:
        feeds += [(b, True) for b in args.backends.split(",") if b]
    from benchmarks.loaders import build

    runs: dict[tuple, list[float]] = {}
    for (name, mask), n in there_and_back(feeds, args.repeats):
        loader = None
        if name == "synthetic":
            batches = synthetic_batches(args.batch, args.size, device, dtype, mask, True)
        else:
            loader = build(name, root, args.size, args.batch, args.cores, True, args.device)
            loader.stage.dtype = dtype
            batches = loader_batches(loader)
        model = _model(args.arch, args.size, device, True)
        runs.setdefault((name, mask), []).extend(
            time_steps(model, batches, args.steps, args.warmup if r == 0 else 1, device, dtype) for r in range(n))
        batches.close()  # stop the loader's iteration, then free its threads before the next row
        if hasattr(loader, "close"):
            loader.close()
    rows = []
    for name, mask in feeds:
        s = spread(runs[(name, mask)])
        rows.append({"feed": name, "mixmask": mask, "images_per_sec": s["median"], "min": s["min"], "max": s["max"],
                     "runs": runs[(name, mask)]})
    ceiling = rows[0]["images_per_sec"]
    for r in rows:
        r["share_of_ceiling"] = r["images_per_sec"] / ceiling
    return rows


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=96, help="view side (px)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--backends", default="torchvision,dali,ffcv-jpg", help="loaders to feed the step ('' = none)")


def print_rows(rows: list[dict], args) -> None:
    print(f"training step: MoCo v2 + MixMask {args.arch} at {args.size} px, batch {args.batch}, {args.precision}, "
          f"{args.device}; median (min-max) of {args.repeats} x {args.steps} steps")
    print(f"{'feed':16} {'mixmask':7} {'img/s':>8} {'min-max':>13} {'share of ceiling':>17}")
    for r in rows:
        print(f"{r['feed']:16} {'on' if r['mixmask'] else 'off':7} {r['images_per_sec']:8.1f} "
              f"{r['min']:6.1f}-{r['max']:<6.1f} {r['share_of_ceiling']:16.2f}")


def main(argv=None) -> int:

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--cores", type=int, default=2)
    add_args(ap)
    a = ap.parse_args(argv)
    root = data_root("", a.images, a.cores) if a.backends else None
    rows = run(a, root)
    print_rows(rows, a)
    Path(a.json).write_text(json.dumps({"args": vars(a), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
