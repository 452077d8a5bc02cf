"""Embedded demo dataset: 10 synthetic shape classes as real JPEGs in ImageFolder layout.

    root/train/<class_name>/<index>.jpg      root/val/<class_name>/<index>.jpg

The class of an image is the SHAPE of one object (CLASSES below). Everything else is a nuisance
drawn independently per image, so neither raw pixels nor a randomly initialised CNN solve it,
while the shape is plainly learnable (a supervised CNN or a self-supervised encoder trained with
crop + colour augmentations):
  - object colour: random HSV (hue uniform, sat 0.15-1, value 0.2-1), 40% a linear two-colour
    gradient; resampled until it contrasts with the background colours;
  - object scale: circumscribed diameter 35-75% of the image; rotation uniform; position uniform
    with the object inside the image;
  - background: one of plain, pixel noise, stripes, checkerboard, blurred blobs, gradient, each
    with random colours, period, angle;
  - 50% of images get a small distractor disc; 30% a reflected copy of the shape (mirror);
    every image gets light sensor noise.

Deterministic: image (split, class c, index i) is drawn from
numpy.random.default_rng(SeedSequence([seed, split_id, c, i])), so the same parameters give the
same bytes (same Pillow/libjpeg build), independent of generation order.

Measured 2026-11-22 (2 shared vCPU AMD EPYC, torch 2.14.1 CPU, numpy 2.4.6, Pillow 13.0.0), defaults
(200 train + 50 val per class, 64 px); kNN top-1, k=20, cosine, train split as bank, val as queries
(chance 10%; scratch scripts knn_eval.py / sup_mem.py, not part of the repo):
  raw pixels (flattened, per-dimension mean/std normalised)          12.0%
  random-init torchvision resnet18, GAP 512-d, ImageNet norm, eval   13.8 / 13.0 / 11.8% (3 inits)
  supervised 6-conv CNN (AdamW, rot90/flip aug), 1000/class, 8 ep     96.8% val accuracy (80% at ep 4;
                                                     trained on the same renders without JPEG)
  same CNN, default 200/class, 25 ep                                  ~52% val accuracy (data-limited:
                                                     n_train_per_class=1000: 10.5k images, ~15-20 s, 42 MB)
Generation of the 2500 default images: 3.2 s on one core; 10 MB on disk.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

try:  # POSIX only; elsewhere concurrent callers rely on the benign rename race below.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

log = logging.getLogger(__name__)

DEMO_VERSION = 1  # bump whenever the generator's output changes; it names the cache folder

# Sorted, so that torchvision's ImageFolder label of a class equals its index here.
CLASSES: tuple[str, ...] = (
    "arrow", "circle", "crescent", "cross", "heart", "lshape", "ring", "square", "star", "triangle",
)
SPLITS: tuple[str, ...] = ("train", "val")
MARKER = ".complete"
JPEG_QUALITY = 90
SUPERSAMPLE = 4  # the object mask is drawn at 4x and downsampled (anti-aliasing)


def default_demo_root() -> Path:
    """$MIXMASK_DATA_DIR/demo-v{DEMO_VERSION}, else ~/.cache/mixmask/demo-v{DEMO_VERSION}."""
    base = os.environ.get("MIXMASK_DATA_DIR")
    base_path = Path(base) if base else Path.home() / ".cache" / "mixmask"
    return base_path.expanduser() / f"demo-v{DEMO_VERSION}"


# ----------------------------------------------------------------------------- shapes
def _normalise(pts: np.ndarray) -> np.ndarray:
    """Centre a polygon on its bounding-box centre and scale its circumradius to 1."""
    pts = pts - (pts.min(0) + pts.max(0)) / 2
    return pts / np.linalg.norm(pts, axis=1).max()


def _regular(n: int, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star() -> np.ndarray:
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return _regular(10) * r[:, None]


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y down
    return _normalise(np.stack([x, y], 1))


# Polygons in unit coordinates (y down), circumradius 1. Discs (circle, ring, crescent) are drawn
# with ellipses in _draw_mask.
_POLYGONS: dict[str, np.ndarray] = {
    "arrow": _normalise(np.array([[-1, -.2], [.15, -.2], [.15, -.6], [1, 0], [.15, .6], [.15, .2], [-1, .2]])),
    "cross": _normalise(np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1],
                                  [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]])),
    "heart": _heart(),
    "lshape": _normalise(np.array([[0, 0], [.38, 0], [.38, .62], [1, .62], [1, 1], [0, 1]])),
    "square": _normalise(_regular(4, np.pi / 4)),
    "star": _normalise(_star()),
    "triangle": _normalise(_regular(3)),
}


def _draw_mask(shape: str, cx: float, cy: float, r: float, theta: float, mirror: bool,
               size: int) -> np.ndarray:
    """Coverage in [0, 1] of the shape centred at (cx, cy) px, circumradius r px, rotation theta."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    X, Y, R = cx * s, cy * s, r * s

    def disc(x: float, y: float, rad: float, fill: int) -> None:
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    if shape == "circle":
        disc(X, Y, R, 255)
    elif shape == "ring":
        disc(X, Y, R, 255)
        disc(X, Y, 0.58 * R, 0)
    elif shape == "crescent":
        disc(X, Y, R, 255)
        d = 0.5 * R
        disc(X + d * np.cos(theta), Y + d * np.sin(theta), 0.85 * R, 0)
    else:
        pts = _POLYGONS[shape].copy()
        if mirror:
            pts[:, 0] = -pts[:, 0]
        c, sn = np.cos(theta), np.sin(theta)
        pts = pts @ np.array([[c, sn], [-sn, c]]) * R + (X, Y)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    small = canvas.resize((size, size), Image.LANCZOS)
    return np.clip(np.asarray(small, np.float32) / 255.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- nuisances
def _colour(rng: np.random.Generator, s_lo: float = 0.15, v_lo: float = 0.2) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(s_lo, 1.0), rng.uniform(v_lo, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255.0


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours a, b with weight t (H, W) -> (H, W, 3)."""
    return a * (1 - t[..., None]) + b * t[..., None]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A random textured background (H, W, 3) float32 and the colours it is made of."""
    a, b = _colour(rng, 0.0, 0.1), _colour(rng, 0.0, 0.1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phi = rng.uniform(0, np.pi)
    u = xx * np.cos(phi) + yy * np.sin(phi)  # coordinate along a random direction
    kind = rng.integers(6)
    if kind == 0:  # plain
        return np.broadcast_to(a, (size, size, 3)).copy(), [a]
    if kind == 1:  # per-pixel noise, grey or coloured
        sigma = rng.uniform(10, 45)
        shape = (size, size, 1) if rng.random() < 0.5 else (size, size, 3)
        return a + rng.normal(0, sigma, shape).astype(np.float32), [a]
    if kind == 2:  # stripes, hard or soft, random period and angle
        period = rng.uniform(3, 16)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
        return _mix(a, b, t), [a, b]
    if kind == 3:  # rotated checkerboard
        cell = rng.uniform(3, 14)
        v = -xx * np.sin(phi) + yy * np.cos(phi)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        return _mix(a, b, t), [a, b]
    if kind == 4:  # blurred blobs: a coarse random field upsampled bicubically
        k = int(rng.integers(2, 7))
        coarse = (rng.random((k, k)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) / 255
        return _mix(a, b, t), [a, b]
    t = np.clip((u - u.min()) / (u.max() - u.min() + 1e-6), 0, 1)  # linear gradient
    return _mix(a, b, t), [a, b]


def _contrasting_colour(rng: np.random.Generator, avoid: list[np.ndarray],
                        min_dist: float = 90.0) -> np.ndarray:
    """A random colour at least min_dist (RGB L2) from every colour in avoid (best of 30 tries)."""
    best, best_d = None, -1.0
    for _ in range(30):
        c = _colour(rng)
        d = min(float(np.linalg.norm(c - x)) for x in avoid)
        if d > best_d:
            best, best_d = c, d
        if d >= min_dist:
            break
    return best


def render(class_index: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One demo image of CLASSES[class_index] as (size, size, 3) uint8, all nuisances from rng."""
    img, bg_colours = _background(rng, size)

    # Object: circumscribed diameter 35-75% of the image, fully inside it, any rotation.
    r = 0.5 * size * rng.uniform(0.35, 0.75)
    cx, cy = rng.uniform(r, size - r, 2)
    theta = rng.uniform(0, 2 * np.pi)
    mirror = bool(rng.random() < 0.3)
    alpha = _draw_mask(CLASSES[class_index], cx, cy, r, theta, mirror, size)

    c1 = _contrasting_colour(rng, bg_colours)
    if rng.random() < 0.4:  # two-colour gradient across the object
        c2 = _contrasting_colour(rng, bg_colours)
        phi = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        t = np.clip(((xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)) / (2 * r) + 0.5, 0, 1)
        fg = _mix(c1, c2, t)
    else:
        fg = c1
    img = img * (1 - alpha[..., None]) + fg * alpha[..., None]

    if rng.random() < 0.5:  # distractor: a small disc of another colour, anywhere
        rd = size * rng.uniform(0.04, 0.09)
        dx, dy = rng.uniform(rd, size - rd, 2)
        beta = _draw_mask("circle", dx, dy, rd, 0.0, False, size)
        img = img * (1 - beta[..., None]) + _colour(rng) * beta[..., None]

    img = img + rng.normal(0, rng.uniform(0, 6), img.shape)  # sensor noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), class_index, index]))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ----------------------------------------------------------------------------- cache on disk
def _params(n_train_per_class: int, n_val_per_class: int, size: int, seed: int) -> dict:
    return {"version": DEMO_VERSION, "classes": list(CLASSES), "n_train_per_class": n_train_per_class,
            "n_val_per_class": n_val_per_class, "size": size, "seed": seed, "quality": JPEG_QUALITY}


def _is_complete(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock) held for the duration of the block."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a") as f:  # never deleted: deleting a lock file races other holders
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _generate(out: Path, params: dict) -> None:
    counts = {"train": params["n_train_per_class"], "val": params["n_val_per_class"]}
    total = len(CLASSES) * sum(counts.values())
    bar = tqdm(total=total, desc=f"demo dataset -> {out.name}", unit="img", disable=None) if tqdm else None
    try:
        for split in SPLITS:
            for c, name in enumerate(CLASSES):
                folder = out / split / name
                folder.mkdir(parents=True)
                for i in range(counts[split]):
                    pixels = render(c, _image_rng(params["seed"], split, c, i), params["size"])
                    (folder / f"{i:05d}.jpg").write_bytes(encode_jpeg(pixels))
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    (out / MARKER).write_text(json.dumps(params))  # last: its presence means complete


def ensure_demo_dataset(root: Path | str | None = None, *, n_train_per_class: int = 200,
                        n_val_per_class: int = 50, size: int = 64, seed: int = 0) -> Path:
    """Return root holding the demo dataset with these parameters, generating it if needed.

    The dataset is written into a temporary sibling folder, completed with the marker file
    root/.complete (JSON of the parameters) and then renamed into place, all under an flock on
    root's sibling '<name>.lock', so concurrent callers (ranks) generate once and a crash never
    leaves a folder that passes for complete. A root whose marker is missing or records other
    parameters is regenerated.
    """
    root = Path(root) if root is not None else default_demo_root()
    params = _params(n_train_per_class, n_val_per_class, size, seed)
    if _is_complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.with_name(root.name + ".lock")):
        if _is_complete(root, params):  # another process finished while we waited
            return root
        if fcntl is not None:  # we hold the lock: leftovers of killed generators are garbage
            for stale in root.parent.glob(f".{root.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        log.info("generating the mixmask demo dataset (v%d) in %s", DEMO_VERSION, root)
        try:
            _generate(tmp, params)
            if root.exists():  # incomplete or other parameters
                shutil.rmtree(root)
            try:
                os.rename(tmp, root)
            except OSError:  # without flock: another process won the race; keep theirs if valid
                if not _is_complete(root, params):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
