"""ImageFolder indexing shared by every backend: root/<split>/<class>/<image>, classes sorted by name.

Errors are DataError with one line that names the path (missing root or split, no class folders,
an empty class folder). Unreadable images are not detected here (that needs a decode); each backend
skips them at load time and counts them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
