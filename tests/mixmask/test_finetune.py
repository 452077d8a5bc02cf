"""Supervised fine-tuning pieces: the smoothed cross-entropy against its formula, the label subset, top-1."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.folder import DataError, FolderIndex, label_subset, load_subset, save_subset
from mixmask.batch import Batch
from mixmask.evaluation import top1_accuracy
from mixmask.frameworks.supervised import FinetuneConfig, Supervised
from mixmask.models import BackboneSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def smoothed_ce_reference(logits: list[list[float]], labels: list[int], eps: float) -> float:
    """Mean over samples of -sum_c q_c log softmax(z)_c with q = (1 - eps) onehot(y) + eps / C."""
    total = 0.0
    for z, y in zip(logits, labels):
        m = max(z)
        log_norm = m + math.log(sum(math.exp(v - m) for v in z))
        C = len(z)
        total += -sum(((1 - eps) * (c == y) + eps / C) * (z[c] - log_norm) for c in range(C))
    return total / len(labels)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_supervised_loss_is_the_smoothed_cross_entropy(eps):
    torch.manual_seed(0)
    model = Supervised(5, arch=BackboneSpec("resnet10", "small"), label_smoothing=eps).eval()
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 3, 4, 3])
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)  # logits far from uniform: the smoothing term matters
    out = model(Batch(x, None, y))
    ref = smoothed_ce_reference(model.logits(x).tolist(), y.tolist(), eps)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
    out["loss"].backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert model.backbone.net.conv1.weight.grad.abs().sum() > 0  # end to end: the backbone is trained too


def _index(counts: list[int]) -> FolderIndex:
    paths, labels = [], []
    for c, n in enumerate(counts):
        paths += [f"/d/train/c{c}/{i:03d}.jpg" for i in range(n)]
        labels += [c] * n
    return FolderIndex(Path("/d/train"), tuple(f"c{c}" for c in range(len(counts))),
                       tuple(paths), tuple(labels))


def test_label_subset_takes_the_rounded_share_of_every_class():
    index = _index([100, 37, 8])
    picked = label_subset(index, 0.1, seed=3)
    labels = np.asarray(index.labels)[picked]
    assert [int((labels == c).sum()) for c in range(3)] == [10, 4, 1]  # round(10), round(3.7), round(0.8)
    assert np.all(np.diff(picked) > 0)  # ascending, no repeats
    assert np.array_equal(picked, label_subset(index, 0.1, seed=3))  # a function of (split, fraction, seed)
    assert not np.array_equal(picked, label_subset(index, 0.1, seed=4))


def test_label_subset_without_an_image_for_a_class_names_it():
    with pytest.raises(DataError, match=r"class 'c2' \(8 images\) without a labelled image; use a fraction >= 0.0625"):
        label_subset(_index([100, 37, 8]), 0.05, seed=0)  # rounds to 5, 2 and 0 images


def test_subset_file_round_trip_and_foreign_paths(tmp_path):
    index = _index([20, 20])
    picked = label_subset(index, 0.25, seed=1)
    save_subset(tmp_path / "subset.json", index, picked, fraction=0.25, seed=1)
    assert np.array_equal(load_subset(tmp_path / "subset.json", index), picked)
    other = _index([3, 3])  # a smaller split: most of the subset's files are not in it
    with pytest.raises(DataError, match="not in"):
        load_subset(tmp_path / "subset.json", other)


def test_top1_counts_each_sample_once():
    # two batches; the second repeats sample 0 (the padding of a sharded split) with a wrong prediction
    logits = {0: [5.0, 0.0], 1: [0.0, 5.0], 2: [5.0, 0.0]}
    batches = [(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1])),
               (torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([2, 0]))]

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([logits[int(i)] for i in ids])

    assert top1_accuracy(fn, batches) == pytest.approx(100 * 2 / 3)  # samples 0, 1 right; 2 wrong


def test_finetune_config_problems():
    assert FinetuneConfig().problems() == []
    bad = FinetuneConfig(fraction=0.0, label_smoothing=1.0, batch_size=1)
    assert len(bad.problems()) == 3
