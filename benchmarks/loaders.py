"""Two-view loader throughput: the torchvision baseline against DALI and FFCV, with and without MixMask.

    python -m benchmarks.loaders --json PATH [--images 1024 --batch 64 --size 224 --repeats 5 --quick]

One run, the same JPEG files and the same cores for every row. The files are an ImageNet-like
generated set (benchmarks/imagenet_like.py: ImageNet's sizes, mostly 500 x 375 / 333, ~110 KB files,
1/f-spectrum natural-image statistics; cached under bench-out/data/ or --data). FFCV rows read .beton
files written once from those files (jpg: re-encoded at quality 90; raw: pixels), cached beside them;
ffcv-jpg-twice decodes each JPEG once per view (two pipelines over the image field, the FFCV-SSL way)
and produces the same views as ffcv-jpg.

A row is a training loader as train.py builds it: two MoCo v2 views of size x size (RandomResizedCrop
0.2-1, jitter p 0.8, grayscale p 0.2, blur p 0.5, flip), then the device stage (normalise to float32
channels_last; + MixMask with our Numba kernel, CUDA on a GPU, when on). Rows are timed there and
back (every row with half its epochs, then in reverse order with the rest; benchmarks.there_and_back),
each time after building the loader and one untimed warm-up epoch (worker spawn, compilation); a timed
epoch runs from asking for the iterator to its last batch on the device (start-up and prefetch fill
included, as at every epoch boundary of a run).
images/s: median over the timed epochs, with their min and max (the noise); per-core = images/s / cores
used; vs_baseline: the median's ratio to the first backend's (same MixMask setting).

Device-stage rows (one per mixing method, mixmask/mixing MIXERS, with the ImageNet defaults of each
method's config section): the stage alone on fixed random uint8 views of the same batch and size on the
training device, from the two uint8 views to the Batch (normalise + the method's masks, mixes, noise,
high-pass, saliency, hard negative); images/s median (min-max) over the repeats of STAGE_CALLS calls each,
and the ratio to normalisation alone ("none"). This is each method's cost inside the pipeline.
--stage-only skips the loader rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks import data_root, imagenet_like, machine, run_cli, spread, there_and_back


def time_pass(loader, epoch: int) -> tuple[float, int]:
    """(images/s, images) of one whole epoch: from asking for the iterator to the last batch on the
    device, so pipeline start-up and prefetch fill count (a pass is a real epoch boundary)."""
    import torch

    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += b.x1.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n


def build(backend: str, root: Path, size: int, batch: int, cores: int, mask: bool, device: str = "cpu",
          hw_decoder_load: float = 0.65):
    import torch

    from mixmask.mixing import MixMask, MixStage
    from loaders.folder import index_split
    from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader

    index = index_split(root, "train")
    aug = AugParams(size)
    stage = MixStage((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), dtype=torch.float32, channels_last=True,
                     mixer=MixMask(grid=8) if mask else None)
    if backend.startswith("ffcv"):  # ffcv-jpg, ffcv-raw, ffcv-jpg-twice (one decode per view, the FFCV-SSL way)
        from loaders.ffcv_backend import FfcvTrainLoader, ensure_beton

        mode = backend.split("-")[1]
        beton = ensure_beton(root, "train", root / f"ffcv-{mode}", write_mode=mode, workers=cores, progress=False)
        return FfcvTrainLoader(beton, aug, stage, batch, workers=cores, device=device,
                               decode_once=not backend.endswith("twice"))
    if backend == "dali":
        from loaders.dali_backend import DaliTrainLoader

        return DaliTrainLoader(index, aug, stage, batch, threads=cores, prefetch=2, device=device,
                               hw_decoder_load=hw_decoder_load)
    return TorchvisionTrainLoader(index, aug, stage, batch, workers=cores, prefetch=4, device=device)


STAGE_CALLS = 5  # stage calls per timed repeat


def stage_rows(methods: list[str], batch: int, size: int, repeats: int, device: str) -> list[dict]:
    """images/s of the device stage alone per mixing method ("none" = normalisation only)."""
    import torch

    from mixmask.config import Config
    from mixmask.mixing import MIXERS, MixStage

    cfg = Config()
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device) for _ in range(2))
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    runs: dict[str, list[float]] = {}
    for method, n in there_and_back(methods, repeats):
        stage = MixStage(cfg.data.mean, cfg.data.std, mixer=None if method == "none" else MIXERS[method].from_config(cfg))
        stage(v1, v2, labels, None, 0, 0)  # warm-up: compilation, caches
        for _ in range(n):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for step in range(STAGE_CALLS):
                stage(v1, v2, labels, None, 0, step + 1)
            if device == "cuda":
                torch.cuda.synchronize()
            runs.setdefault(method, []).append(STAGE_CALLS * batch / (time.perf_counter() - t0))
    rows = [{"method": m, "runs": runs[m], **{("images_per_sec" if k == "median" else k): v
                                                for k, v in spread(runs[m]).items()}} for m in methods]
    base = next((r for r in rows if r["method"] == "none"), rows[0])
    for r in rows:
        r["vs_none"] = r["images_per_sec"] / base["images_per_sec"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--data", default="", help="JPEG set in ImageFolder layout (default: the generated "
                    "ImageNet-like set, cached in bench-out/data/)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="torchvision,dali,ffcv-jpg,ffcv-jpg-twice,ffcv-raw",
                    help="first = the baseline of the ratios; ffcv-<raw|jpg>[-twice]: .beton mode, twice = decode per view")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--device", default="cpu", help="training device of the batches (cuda: DALI decodes with "
                    "the mixed nvJPEG decoder and the mix runs as our CUDA kernel)")
    ap.add_argument("--hw-decoder-load", type=float, default=0.65, help="DALI on cuda: hardware decoder share")
    ap.add_argument("--methods", default="none,mixmask,unmix,unmix_mixmask,mscn,saliency,saliency_mixmask",
                    help="device-stage rows, one per mixing method (none = normalisation only; empty = no rows)")
    ap.add_argument("--stage-only", action="store_true", help="only the device-stage rows (no JPEG set needed)")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI: 48 images, 64 px, 1 repeat")
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.batch, a.size, a.repeats = 48, 16, 64, 1
    import torch

    torch.set_num_threads(a.cores)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    stage = stage_rows(methods, a.batch, a.size, a.repeats, a.device) if methods else []
    root = None if a.stage_only else data_root(a.data, a.images, a.cores)
    facts = imagenet_like.facts(root) if root else {}
    rows = []
    backends = [] if a.stage_only else [b.strip() for b in a.backends.split(",") if b.strip()]
    runs: dict[tuple, list[float]] = {}
    plan = [(backend, mask) for mask in (False, True) for backend in backends]
    for (backend, mask), n in there_and_back(plan, a.repeats):
        loader = build(backend, root, a.size, a.batch, a.cores, mask, a.device, a.hw_decoder_load)
        time_pass(loader, 0)  # warm-up epoch: worker spawn, compilation, caches
        done = runs.setdefault((backend, mask), [])
        done += [time_pass(loader, epoch)[0] for epoch in range(len(done) + 1, len(done) + n + 1)]
        if hasattr(loader, "close"):
            loader.close()
        del loader
    for backend, mask in plan:
        s = spread(runs[(backend, mask)])
        rows.append({"backend": backend, "mixmask": mask, "images_per_sec": s["median"], "min": s["min"],
                     "max": s["max"], "runs": runs[(backend, mask)], "per_core": s["median"] / a.cores})
    for r in rows:
        base = next(x for x in rows if x["backend"] == backends[0] and x["mixmask"] == r["mixmask"])
        r["vs_baseline"] = r["images_per_sec"] / base["images_per_sec"]
    device = machine() | {"cores": a.cores, "device": a.device,
                          "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
                          "hw_decoder_load": a.hw_decoder_load if a.device == "cuda" else None}
    if stage:
        print(f"device stage alone, batch {a.batch} of {a.size}px views, {a.device}, median (min-max) of {a.repeats} x "
              f"{STAGE_CALLS} calls")
        print(f"{'method':18} {'img/s':>9} {'min-max':>15} {'vs none':>8}")
        for r in stage:
            print(f"{r['method']:18} {r['images_per_sec']:9.1f} {r['min']:7.0f}-{r['max']:<7.0f} {r['vs_none']:7.2f}x")
    if a.stage_only:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"device": device, "args": vars(a), "stage": stage}, indent=2))
        print(f"wrote {a.json}")
        return 0
    print(f"two-view loaders, {facts['files']} JPEGs ~{facts['mean_wh'][0]:.0f}x{facts['mean_wh'][1]:.0f} "
          f"{facts['mean_kb']:.0f} KB, views {a.size}px, batch {a.batch}, {a.cores} cores, device {a.device}, "
          f"median (min-max) of {a.repeats} epochs")
    print(f"device: {device['cpu']}, torch {device['torch']}, dali {device['dali'] or '-'}, "
          f"ffcv {device['ffcv'] or '-'}, {device['date']}")
    print(f"{'backend':15} {'mixmask':7} {'img/s':>8} {'min-max':>13} {'per core':>8} {'vs ' + backends[0]:>15}")
    for r in rows:
        print(f"{r['backend']:15} {'on' if r['mixmask'] else 'off':7} {r['images_per_sec']:8.1f} "
              f"{r['min']:6.0f}-{r['max']:<6.0f} {r['per_core']:8.1f} {r['vs_baseline']:14.2f}x")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"device": device, "dataset": facts, "args": vars(a), "results": rows,
                                        "stage": stage}, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
