"""Two-view loader throughput: the torchvision baseline against DALI, with and without MixMask.

    python -m benchmarks.loaders --json PATH [--images 512 --batch 64 --size 224 --repeats 3 --quick]

One run, the same JPEG files and the same cores for every row. The files are an ImageNet-like
generated set (cached under bench-out/jpegs-<n>/ or --data): sizes drawn around 500 x 375 (longer
side 400-640 px, aspect 0.6-0.9, either orientation), natural-image statistics (1/f amplitude
spectrum colour noise with a few smooth objects), JPEG quality 90 (~100 KB each). FFCV rows read .beton
files written once from those files (jpg: re-encoded at quality 90; raw: pixels), cached beside them;
ffcv-jpg-twice decodes each JPEG once per view (two pipelines over the image field, the FFCV-SSL way)
and produces the same views as ffcv-jpg.

A row is a training loader as train.py builds it: two MoCo v2 views of size x size (RandomResizedCrop
0.2-1, jitter p 0.8, grayscale p 0.2, blur p 0.5, flip), then the device stage (normalise to float32
channels_last; + MixMask with our Numba kernel, CUDA on a GPU, when on). One untimed warm-up epoch
(worker spawn, compilation), then --repeats timed epochs, each from asking for the iterator to its last
batch on the device (start-up and prefetch fill included, as at every epoch boundary of a run).
images/s: median over the timed epochs; per-core = images/s / cores used.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import cpu_model, package_version


def natural_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8 with a 1/f amplitude spectrum per channel (correlated) plus smooth blobs."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(w, h))
    base = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    chans = []
    for c in range(3):
        noise = 0.6 * base + 0.4 * (rng.standard_normal(base.shape) + 1j * rng.standard_normal(base.shape))
        x = np.fft.irfft2(noise * amp, s=(h, w))
        chans.append((x - x.mean()) / (x.std() + 1e-8))
    img = np.stack(chans, -1) * 40 + rng.uniform(80, 170, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(2, 6)):  # a few smooth objects
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        m = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))[..., None]
        img = img * (1 - m) + m * rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, n: int, classes: int = 8, seed: int = 0) -> Path:
    """root/train/<class>/*.jpg (and a small val split, which the loaders' checks expect)."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            long = int(rng.uniform(400, 640))
            short = int(long * rng.uniform(0.6, 0.9))
            w, h = (long, short) if rng.uniform() < 0.75 else (short, long)
            d = root / split / f"c{i % classes:02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(natural_image(rng, w, h)).save(d / f"{i:06d}.jpg", quality=90)
    done.write_text("ok\n")
    return root


def dataset_facts(root: Path) -> dict:
    from PIL import Image

    files = sorted((root / "train").glob("*/*.jpg"))
    sizes = [Image.open(f).size for f in files[:200]]
    return {"files": len(files), "mean_kb": float(np.mean([f.stat().st_size for f in files]) / 1024),
            "mean_wh": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))]}


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

    from loaders.device_stage import MixStage
    from loaders.folder import index_split
    from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader

    index = index_split(root, "train")
    aug = AugParams(size)
    stage = MixStage((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.float32, True, mask, grid=8)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--data", default="", help="JPEG set (default: generated under bench-out/)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="torchvision,dali,ffcv-jpg,ffcv-jpg-twice,ffcv-raw",
                    help="first = the baseline of the ratios; ffcv-<raw|jpg>[-twice]: .beton mode, twice = decode per view")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--device", default="cpu", help="training device of the batches (cuda: DALI decodes with "
                    "the mixed nvJPEG decoder and the mix runs as our CUDA kernel)")
    ap.add_argument("--hw-decoder-load", type=float, default=0.65, help="DALI on cuda: hardware decoder share")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI: 48 images, 64 px, 1 repeat")
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.batch, a.size, a.repeats = 48, 16, 64, 1
    root = Path(a.data) if a.data else make_dataset(Path("bench-out") / f"jpegs-{a.images}", a.images)
    facts = dataset_facts(root)
    import torch

    torch.set_num_threads(a.cores)
    rows = []
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    for mask in (False, True):
        for backend in backends:
            loader = build(backend, root, a.size, a.batch, a.cores, mask, a.device, a.hw_decoder_load)
            time_pass(loader, 0)  # warm-up epoch: worker spawn, compilation, caches
            runs = [time_pass(loader, epoch)[0] for epoch in range(1, a.repeats + 1)]
            if hasattr(loader, "close"):
                loader.close()
            del loader
            rows.append({"backend": backend, "mixmask": mask, "images_per_sec": statistics.median(runs),
                         "runs": runs, "per_core": statistics.median(runs) / a.cores})
    for r in rows:
        base = next(x for x in rows if x["backend"] == backends[0] and x["mixmask"] == r["mixmask"])
        r["vs_baseline"] = r["images_per_sec"] / base["images_per_sec"]
    device = {"cpu": cpu_model(), "cores": a.cores, "device": a.device,
              "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
              "hw_decoder_load": a.hw_decoder_load if a.device == "cuda" else None, "python": platform.python_version(),
              "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "loadavg": os.getloadavg(), "dali": package_version("nvidia-dali-cuda130"),
              "ffcv": package_version("ffcv")}
    print(f"two-view loaders, {facts['files']} JPEGs ~{facts['mean_wh'][0]:.0f}x{facts['mean_wh'][1]:.0f} "
          f"{facts['mean_kb']:.0f} KB, views {a.size}px, batch {a.batch}, {a.cores} cores, device {a.device}, "
          f"median of {a.repeats} passes")
    print(f"device: {device['cpu']}, torch {device['torch']}, dali {device['dali'] or '-'}, "
          f"ffcv {device['ffcv'] or '-'}, {device['date']}")
    print(f"{'backend':12} {'mixmask':7} {'img/s':>8} {'per core':>8} {'vs ' + backends[0]:>15}")
    for r in rows:
        print(f"{r['backend']:12} {'on' if r['mixmask'] else 'off':7} {r['images_per_sec']:8.1f} "
              f"{r['per_core']:8.1f} {r['vs_baseline']:14.2f}x")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"device": device, "dataset": facts, "args": vars(a), "results": rows},
                                       indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
