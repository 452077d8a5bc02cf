"""A generated ImageNet-like JPEG set for the loader benchmarks: ImageNet-1K's sizes and file sizes,
natural-image statistics, generated once and cached.

    root/train/cNN/<index>.jpg  (CLASSES folders)      root/val/cNN/<index>.jpg  (one per class)

What is matched (ILSVRC-2012 train: 1,281,167 JPEGs, ~110 KB each on average (the 138 GiB archive),
mean resolution ~469 x 387, the mode 500 x 375; most images were scaled to a longer side of 500):
- size: longer side 500 with p 0.8, else log-uniform over 200-1000 px; aspect (short / long) 3:4 with
  p 0.55, 2:3 with p 0.2, else uniform 0.5-1; landscape with p 0.75. Mean ~465 x 400.
- content: per channel a 1/f amplitude spectrum (the power law of natural images, Field 1987), the
  channels correlated, plus 2-5 smooth blobs (objects); JPEG quality uniform over 91-97 (4:2:0):
  ~110 KB per file on average, so decode work per byte and per pixel is ImageNet's.
Image i of a split is drawn from default_rng(SeedSequence([seed, split, i])): the same bytes for the
same parameters, in any order and any number of processes (files are written by `workers` processes).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from loaders.generated import ensure_generated

VERSION = 2  # bump whenever the generator's output changes (the cache marker records it)
SPLITS = ("train", "val")


def natural_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8 with a 1/f amplitude spectrum per channel (correlated) plus smooth blobs."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(w, h))
    base = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    chans = []
    for _ in range(3):
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


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn from the ImageNet-like size distribution of the module docstring."""
    long = 500 if rng.uniform() < 0.8 else int(np.exp(rng.uniform(np.log(200), np.log(1000))))
    u = rng.uniform()
    aspect = 0.75 if u < 0.55 else (2 / 3 if u < 0.75 else rng.uniform(0.5, 1.0))
    short = max(1, round(long * aspect))
    return (long, short) if rng.uniform() < 0.75 else (short, long)


def encode(rng: np.random.Generator) -> bytes:
    """One image's JPEG bytes."""
    from PIL import Image

    w, h = image_size(rng)
    pixels = natural_image(rng, w, h)
    quality = int(rng.integers(91, 98))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write(job: tuple[str, int, int, int, str]) -> int:
    folder, seed, split_id, i, name = job
    data = encode(np.random.default_rng(np.random.SeedSequence([seed, split_id, i])))
    (Path(folder) / name).write_bytes(data)
    return len(data)


def _generate(out: Path, params: dict, workers: int) -> None:
    from tqdm import tqdm

    jobs = []
    for split_id, split in enumerate(SPLITS):
        count = params["images"] if split == "train" else params["classes"]
        for i in range(count):
            folder = out / split / f"c{i % params['classes']:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((str(folder), params["seed"], split_id, i, f"{i:06d}.jpg"))
    with ProcessPoolExecutor(max(1, workers)) as pool:
        done = pool.map(_write, jobs, chunksize=8)
        for _ in tqdm(done, total=len(jobs), desc=f"ImageNet-like JPEGs -> {out.name}", unit="img", disable=None):
            pass


def ensure(root: Path, images: int, classes: int = 8, seed: int = 0, workers: int | None = None) -> Path:
    """root holding `images` train JPEGs (and `classes` val ones, which the loaders' checks expect),
    generated on first use with `workers` processes (default: the usable cores) and cached."""
    params = {"version": VERSION, "images": images, "classes": classes, "seed": seed}
    workers = workers or len(os.sched_getaffinity(0))
    return ensure_generated(Path(root), params, lambda out: _generate(out, params, workers))


def facts(root: Path, sample: int = 400) -> dict:
    """What the set is: file count, mean file size (KB, all files), mean width x height (a sample)."""
    from PIL import Image

    files = sorted((Path(root) / "train").glob("*/*.jpg"))
    if not files:
        return {"files": 0, "mean_kb": 0.0, "mean_wh": [0.0, 0.0]}
    step = max(1, len(files) // sample)
    sizes = [Image.open(f).size for f in files[::step]]
    return {"files": len(files), "mean_kb": float(np.mean([f.stat().st_size for f in files]) / 1024),
            "mean_wh": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))]}
