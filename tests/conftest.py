"""Shared fixtures: a tiny demo dataset (its .beton files, a label subset of it) and the gpu marker
(skipped, with the reason, without a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    from hypothesis import settings
except ImportError:  # the dev extra brings it; tests/mixmask/test_config_fuzz.py skips without it
    pass
else:
    # ci (the default): the same 200 examples a test on every run, no deadline on a loaded machine, no
    # example database (hypothesis still caches constants in .hypothesis/, git-ignored);
    # HYPOTHESIS_PROFILE=dev: a longer random search
    settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, database=None)
    settings.register_profile("dev", max_examples=1000, deadline=None, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (pytestmark = usefixtures("one_thread")): they
    gain nothing from threads, and on a shared machine the threads spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The demo generator at 32 px with 8 train / 4 val images per class (80 + 40 JPEGs)."""
    from loaders.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train_per_class=8, n_val_per_class=4, size=32)


@pytest.fixture(scope="session")
def tiny_betons(tiny_data, tmp_path_factory) -> Path:
    """<dir>/train.beton and <dir>/val.beton of tiny_data (write_beton's default jpg mode), written once per session."""
    pytest.importorskip("ffcv", reason="FFCV not installed (pip install '.[ffcv]')")
    from loaders.ffcv_backend import write_beton

    out = tmp_path_factory.mktemp("betons")
    for split in ("train", "val"):
        write_beton(tiny_data, split, out / f"{split}.beton", workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def label_subset():
    """33 distinct positions of tiny_data's 80 train images, unsorted and not a prefix: a label subset."""
    import numpy as np

    return np.array(list(range(0, 80, 3)) + [79, 1, 41, 43, 44, 46])


GRADIENT_SIZE = (80, 60)  # (W, H) of the gradient_data images


@pytest.fixture(scope="session")
def gradient_data(tmp_path_factory) -> Path:
    """24 identical 80 x 60 PNGs (2 classes x 12, train split) whose colour encodes the position:
    R = 3 x + 8, G = 4 y + 8, B = 128 at pixel (x, y). The mean R, G of a crop (resized by any linear
    filter) give its centre: ((mean R - 8) / 3 + 0.5, (mean G - 8) / 4 + 0.5) px (ContrastiveCrop tests)."""
    import numpy as np
    from PIL import Image

    W, H = GRADIENT_SIZE
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    img = np.stack([3 * x + 8, 4 * y + 8, np.full_like(x, 128)], -1).astype(np.uint8)  # (H, W, 3)
    root = tmp_path_factory.mktemp("gradient")
    for c in range(2):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for k in range(12):
            Image.fromarray(img).save(d / f"{k:02d}.png")
    return root
