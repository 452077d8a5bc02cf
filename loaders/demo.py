"""Embedded demo dataset: 10 synthetic shape classes as real JPEGs in ImageFolder layout.

    root/train/<class_name>/<index>.jpg      root/val/<class_name>/<index>.jpg

The class of an image is the SHAPE of one object (CLASSES below). Everything else is a nuisance
drawn independently per image, so neither raw pixels nor a randomly initialised CNN solve it,
while the shape is learnable, by self-supervision too:
  - object colour: one of 6 saturated hues; background: one of 4 colours with grey grain;
    both palettes are shared by every class (colour is no class cue, and only a weak instance cue);
  - object scale: circumscribed diameter 50-90% of the image; rotation uniform; position uniform
    with the object inside the image; light sensor noise.

Deterministic: image (split, class c, index i) is drawn from
numpy.random.default_rng(SeedSequence([seed, split_id, c, i])), so the same parameters give the
same bytes (same Pillow/libjpeg build), independent of generation order.

Measured 2026-11-22 (2 vCPU AMD EPYC, torch 2.14.1 CPU), defaults (500 train + 100 val per class):
kNN top-1 (k=200, T=0.1, train split as bank) of a random-init ResNet-18 at 32 px: ~20%; after the
demo's MoCo v2 + MixMask run (configs/demo.yaml): see README.md. v1 of this generator (random colours,
textured backgrounds, distractors) kept a random ResNet-18 at 12-14% but also MoCo at chance.
"""

from __future__ import annotations

import colorsys
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loaders.generated import MARKER, ensure_generated  # noqa: F401 (MARKER: demo.MARKER)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

log = logging.getLogger(__name__)

DEMO_VERSION = 2  # bump whenever the generator's output changes; it names the cache folder

# Sorted, so that torchvision's ImageFolder label of a class equals its index here.
CLASSES: tuple[str, ...] = (
    "arrow", "circle", "crescent", "cross", "heart", "lshape", "ring", "square", "star", "triangle",
)
SPLITS: tuple[str, ...] = ("train", "val")
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
# Small palettes, shared by every class: colour and background then tell little about which image a
# view came from (about 1/24 of the set shares them), so instance discrimination (MoCo) has to use the
# object's shape and pose -- which is what the classes are. With unique random colours per image, MoCo
# learns colour and the shape kNN stays at chance (measured: v1 of this generator).
OBJECT_HUES = (0.0, 0.15, 0.33, 0.55, 0.7, 0.85)  # HSV hues of the object colours (s=0.8, v=0.9)
BACKGROUNDS = ((40, 40, 40), (200, 200, 200), (60, 80, 120), (120, 90, 60))  # RGB


def render(class_index: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One demo image of CLASSES[class_index] as (size, size, 3) uint8, all nuisances from rng."""
    bg = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], np.float32)
    grain = rng.normal(0, rng.uniform(0, 15), (size, size, 1))  # grey grain, 0-15 levels
    img = np.broadcast_to(bg, (size, size, 3)) + grain
    # Object: circumscribed diameter 50-90% of the image, inside it, any rotation and position.
    r = 0.5 * size * rng.uniform(0.5, 0.9)
    cx, cy = rng.uniform(r, size - r, 2)
    alpha = _draw_mask(CLASSES[class_index], cx, cy, r, rng.uniform(0, 2 * np.pi), False, size)
    fg = np.array(colorsys.hsv_to_rgb(OBJECT_HUES[rng.integers(len(OBJECT_HUES))], 0.8, 0.9), np.float32) * 255
    img = img * (1 - alpha[..., None]) + fg * alpha[..., None]
    img = img + rng.normal(0, 3, img.shape)  # sensor noise
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


def _generate(out: Path, params: dict) -> None:
    counts = {"train": params["n_train_per_class"], "val": params["n_val_per_class"]}
    total = len(CLASSES) * sum(counts.values())
    bar = tqdm(total=total, desc=f"demo dataset -> {out.name}", unit="img", disable=None) if tqdm else None
    try:
        for split in SPLITS:
            for c, name in enumerate(CLASSES):
                folder = out / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(counts[split]):
                    pixels = render(c, _image_rng(params["seed"], split, c, i), params["size"])
                    (folder / f"{i:05d}.jpg").write_bytes(encode_jpeg(pixels))
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()


def ensure_demo_dataset(root: Path | str | None = None, *, n_train_per_class: int = 500,
                        n_val_per_class: int = 100, size: int = 64, seed: int = 0) -> Path:
    """Return root holding the demo dataset with these parameters, generating it if needed (once, atomically,
    under a lock: loaders/generated.py); a root generated with other parameters is regenerated."""
    root = Path(root) if root is not None else default_demo_root()
    params = _params(n_train_per_class, n_val_per_class, size, seed)

    def generate(out: Path) -> None:  # only when no complete copy is there, once across processes
        log.info("generating the mixmask demo dataset (v%d) in %s", DEMO_VERSION, root)
        _generate(out, params)

    return ensure_generated(root, params, generate)
