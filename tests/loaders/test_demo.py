"""The embedded demo dataset: layout, determinism, caching/atomicity, and nuisance variation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders.demo as demo
from loaders.demo import CLASSES, DEMO_VERSION, ensure_demo_dataset

REPO = Path(__file__).resolve().parents[2]
TINY = dict(n_train_per_class=3, n_val_per_class=2, size=64, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("a") / "demo", **TINY)


def test_imagefolder_layout_of_real_jpegs(tiny):
    assert sorted(p.name for p in tiny.iterdir() if p.is_dir()) == ["train", "val"]
    for split, n in (("train", TINY["n_train_per_class"]), ("val", TINY["n_val_per_class"])):
        assert sorted(p.name for p in (tiny / split).iterdir()) == sorted(CLASSES)
        for name in CLASSES:
            files = sorted((tiny / split / name).iterdir())
            assert [f.name for f in files] == [f"{i:05d}.jpg" for i in range(n)]
            for f in files:
                with Image.open(f) as im:
                    assert im.format == "JPEG"
                    assert (im.size, im.mode) == ((64, 64), "RGB")
                    im.load()  # decodes fully
    assert len(CLASSES) == 10 and list(CLASSES) == sorted(CLASSES)  # ImageFolder label == index
    marker = json.loads((tiny / demo.MARKER).read_text())
    assert marker["version"] == DEMO_VERSION and marker["n_train_per_class"] == 3
    # Nothing left beside root but its lock file (no temporary folders).
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["demo", "demo.lock"]


def test_size_parameter(tmp_path):
    root = ensure_demo_dataset(tmp_path / "d", n_train_per_class=1, n_val_per_class=1, size=32)
    with Image.open(root / "val" / CLASSES[0] / "00000.jpg") as im:
        assert im.size == (32, 32)


def test_same_parameters_same_bytes_other_seed_other_bytes(tiny, tmp_path):
    again = _files(ensure_demo_dataset(tmp_path / "b", **TINY))
    first = _files(tiny)
    assert len(first) == 10 * 5 and again == first
    other = _files(ensure_demo_dataset(tmp_path / "c", **{**TINY, "seed": 1}))
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first) == len(first)


def test_cached_call_does_not_regenerate(tmp_path):
    root = ensure_demo_dataset(tmp_path / "d", **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")}
    (root / "sentinel").write_text("x")
    assert ensure_demo_dataset(root, **TINY) == root
    assert (root / "sentinel").exists()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")} == stamps


def test_folder_without_marker_is_regenerated(tmp_path):
    root = ensure_demo_dataset(tmp_path / "d", **TINY)
    expected = _files(root)
    (root / demo.MARKER).unlink()
    (root / "sentinel").write_text("x")
    (root / "train" / CLASSES[0] / "00000.jpg").write_bytes(b"half-written")
    ensure_demo_dataset(root, **TINY)
    assert not (root / "sentinel").exists() and (root / demo.MARKER).exists()
    assert _files(root) == expected


def test_other_parameters_are_regenerated(tmp_path):
    root = ensure_demo_dataset(tmp_path / "d", **TINY)
    ensure_demo_dataset(root, **{**TINY, "n_val_per_class": 4})
    assert len(list((root / "val" / CLASSES[0]).iterdir())) == 4
    assert json.loads((root / demo.MARKER).read_text())["n_val_per_class"] == 4


def test_crash_mid_generation_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []
    real = demo.encode_jpeg

    def failing(pixels):
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt  # a crash / Ctrl-C in the middle of the run
        return real(pixels)

    monkeypatch.setattr(demo, "encode_jpeg", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(tmp_path / "d", **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.lock"]  # no root, no temp folder
    monkeypatch.setattr(demo, "encode_jpeg", real)
    root = ensure_demo_dataset(tmp_path / "d", **TINY)
    assert len(list(root.rglob("*.jpg"))) == 50


def test_two_processes_at_once(tiny, tmp_path):
    code = ("import sys; from loaders.demo import ensure_demo_dataset; "
            "ensure_demo_dataset(sys.argv[1], n_train_per_class=3, n_val_per_class=2)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "d")], env=env,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    assert _files(tmp_path / "d") == _files(tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "d.lock"]


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXMASK_DATA_DIR", str(tmp_path))
    assert demo.default_demo_root() == tmp_path / f"demo-v{DEMO_VERSION}"
    monkeypatch.delenv("MIXMASK_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_demo_root() == tmp_path / "home" / ".cache" / "mixmask" / f"demo-v{DEMO_VERSION}"


def test_class_changes_the_object_not_the_nuisances():
    # Same nuisance seed, different class: same background, different object.
    imgs = [demo.render(c, np.random.default_rng(123)).astype(np.float32) for c in range(len(CLASSES))]
    for a in range(len(imgs)):
        for b in range(a + 1, len(imgs)):
            changed = np.abs(imgs[a] - imgs[b]).max(-1) > 40
            assert 0.01 < changed.mean() < 0.6, (CLASSES[a], CLASSES[b], changed.mean())


def test_colour_is_not_a_class_cue(tmp_path):
    root = ensure_demo_dataset(tmp_path / "d", n_train_per_class=20, n_val_per_class=10)

    def mean_rgb(split):
        x, y = [], []
        for c, name in enumerate(CLASSES):
            for f in sorted((root / split / name).iterdir()):
                x.append(np.asarray(Image.open(f), np.float32).mean((0, 1)))
                y.append(c)
        return np.array(x), np.array(y)

    xtr, ytr = mean_rgb("train")
    xva, yva = mean_rgb("val")
    # Within every class the image colour varies a lot (0-255 scale).
    for c in range(len(CLASSES)):
        assert xtr[ytr == c].std(0).mean() > 25, CLASSES[c]
    # Nearest class mean on the mean colour is near chance (10%).
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(len(CLASSES))])
    pred = np.linalg.norm(xva[:, None] - centroids[None], axis=-1).argmin(1)
    assert (pred == yva).mean() < 0.35
