"""Shared fixtures: a tiny demo dataset and the gpu marker (skipped, with the reason, without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The demo generator at 32 px with 8 train / 4 val images per class (80 + 40 JPEGs)."""
    from loaders.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train_per_class=8, n_val_per_class=4, size=32)
