"""ImageFolder indexing shared by every backend: root/<split>/<class>/<image>, classes sorted by name.

Errors are DataError with one line that names the path (missing root or split, no class folders,
an empty class folder). Unreadable images are not detected here (that needs a decode); each backend
skips them at load time and counts them.

Label subsets (the semi-supervised protocol): ``label_subset`` draws a fixed share of each class,
``save_subset`` / ``load_subset`` write and read it as JSON (paths relative to the split) so that a run
can be repeated on the same images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """A problem with the data on disk; the message names the path."""


@dataclass(frozen=True)
class FolderIndex:
    """The (path, label) list of one split, in a fixed order (class, then file name)."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def index_split(root: str | Path, split: str) -> FolderIndex:
    """Index root/split; raise DataError with the offending path when the layout is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"split folder not found: {split_dir} (expected {root}/{split}/<class>/<images>)")
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {split_dir}")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(
            e.path
            for e in os.scandir(split_dir / name)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise DataError(f"empty class folder (no images): {split_dir / name}")
        paths.extend(files)
        labels.extend([label] * len(files))
    return FolderIndex(split_dir, tuple(classes), tuple(paths), tuple(labels))


def label_subset(index: FolderIndex, fraction: float, seed: int) -> np.ndarray:
    """A fixed share of each class's images (semi-supervised protocol): round(fraction x n_c) of the n_c
    images of class c, drawn by a permutation keyed by (seed, c) alone, so the subset depends on nothing
    but the split, the fraction and the seed.  -> (m,) int64 folder positions, ascending

    Raises DataError naming the first class left without an image."""
    labels = np.asarray(index.labels, np.int64)
    picked = []
    for c, name in enumerate(index.classes):
        members = np.flatnonzero(labels == c)
        take = int(np.floor(fraction * len(members) + 0.5))
        if take == 0:
            need = 0.5 / len(members)
            raise DataError(f"a label fraction of {fraction:g} leaves class {name!r} ({len(members)} images) without a "
                            f"labelled image; use a fraction >= {need:.3g}")
        order = np.random.default_rng([seed, c, 0x5E]).permutation(len(members))
        picked.append(members[order[:take]])
    return np.sort(np.concatenate(picked))


def save_subset(path: Path, index: FolderIndex, positions: np.ndarray, **facts) -> None:
    """Write a subset as JSON: the facts given (fraction, seed) and its images' paths relative to the split."""
    rel = [os.path.relpath(index.paths[i], index.root) for i in positions]
    path.write_text(json.dumps({**facts, "images": len(rel), "paths": rel}, indent=1))


def load_subset(path: Path, index: FolderIndex) -> np.ndarray:
    """The folder positions of a subset file written by save_subset; DataError for a path not in the split."""
    try:
        rel = json.loads(Path(path).read_text())["paths"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the label subset {path}: {e}") from None
    where = {os.path.relpath(p, index.root): i for i, p in enumerate(index.paths)}
    missing = [r for r in rel if r not in where]
    if missing:
        raise DataError(f"label subset {path}: {len(missing)} images are not in {index.root}, e.g. {missing[0]}")
    return np.sort(np.asarray([where[r] for r in rel], np.int64))
