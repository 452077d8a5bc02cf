"""The evaluation loaders of every backend (TorchvisionEvalLoader, DaliEvalLoader, FfcvEvalLoader) on the
CPU: every sample of the split once after dropping repeats (one process, and sharded over two or three),
the folder index's labels, the pixels of the torchvision eval transform, and DALI's skipped files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from loaders.folder import DataError, index_split
from loaders.torchvision_backend import TorchvisionEvalLoader, decode_image, eval_transform
from mixmask.mixing import MixStage

# numba's dispatcher finalizers raise KeyError on FFCV's generated functions at garbage collection (harmless)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 16  # resize round(16 * 8/7) = 18: the 32 px demo images are downscaled, then centre-cropped
BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.dali), pytest.param("ffcv", marks=pytest.mark.ffcv)]


def make(backend: str, request, rank: int = 0, world: int = 1, batch: int = 16, root=None):
    """The val-split eval loader of `backend` (its package missing: skipped, with the reason)."""
    root = root or request.getfixturevalue("tiny_data")
    index, st = index_split(root, "val"), MixStage(MEAN, STD)
    if backend == "torchvision":
        return TorchvisionEvalLoader(index, eval_transform(SIZE), st, batch, rank, world, workers=0)
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install '.[dali]')")
        from loaders.dali_backend import DaliEvalLoader

        return DaliEvalLoader(index, SIZE, 0, st, batch, rank, world, threads=1)
    from loaders.ffcv_backend import FfcvEvalLoader  # tiny_betons skips without ffcv

    beton = request.getfixturevalue("tiny_betons") / "val.beton"
    return FfcvEvalLoader(beton, SIZE, 0, st, batch, rank, world, workers=1, classes=index.classes)


def one_pass(ld) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, 3, S, S), labels (n,), index (n,) of one pass, with the contract's checks per batch."""
    ld.set_epoch(0)
    xs, ys, idx = [], [], []
    for x, y, i in ld:
        assert x.shape == (len(i), 3, SIZE, SIZE) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and i.dtype == torch.int64 and y.shape == i.shape == (len(i),)
        xs.append(x), ys.append(y), idx.append(i)
    assert len(xs) == len(ld)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_once_with_its_label(backend, request, tiny_data):
    """40 val images, batch 16: batches of 16, 16, 8; every index once, in order, with the folder's label;
    a second pass (the pipeline reused) gives the same batches."""
    index = index_split(tiny_data, "val")
    ld = make(backend, request)
    x, y, i = one_pass(ld)
    assert i.tolist() == list(range(40)) and y.tolist() == list(index.labels)
    assert ld.classes == index.classes and len(ld) == 3
    x2, _, i2 = one_pass(ld)
    assert torch.equal(i, i2) and torch.equal(x, x2)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_cover_the_split_with_equal_counts(backend, world, request, tiny_data):
    """Sharded with padding: each rank gets ceil(40 / world) samples (world 3: two repeats), the union is
    the split, and each (x, label) is its index's whichever rank yields it."""
    index = index_split(tiny_data, "val")
    whole = one_pass(make(backend, request))[0]  # (40, 3, S, S) in index order
    per_rank = [one_pass(make(backend, request, r, world)) for r in range(world)]
    assert {len(i) for _, _, i in per_rank} == {-(-40 // world)}
    assert set(torch.cat([i for _, _, i in per_rank]).tolist()) == set(range(40))
    for x, y, i in per_rank:
        assert y.tolist() == [index.labels[k] for k in i.tolist()] and torch.equal(x, whole[i])


def _pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised (n, 3, S, S) -> (n, S, S, 3) float64 in uint8 units."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x.float() * std + mean) * 255).permute(0, 2, 3, 1).double().numpy()


# Mean absolute difference from torchvision's eval_transform (PIL bilinear Resize(18) + CenterCrop(16)),
# uint8 levels, measured on tiny_data val (32 px demo JPEGs; neighbouring pixels differ by ~11 levels):
# DALI 0.15 (antialiased linear resize too; float rounding), FFCV 2.9 (the .beton re-encodes the JPEGs at
# q90: 2.5 alone where nothing is resized; then its centre crop of int(32 * 16/18) = 28 px instead of 28.44
# resized by OpenCV). For scale: squashing without the crop gives 8.0 (DALI) and 9.6 (FFCV), another image
# ~73. (Size 32, i.e. resize 37, would add a 1 px shift: torchvision rounds the crop offset 2.5 to 2,
# DALI and FFCV to 3.)
TOLERANCE = {"dali": 1.0, "ffcv": 6.0}


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_pixels_agree_with_the_torchvision_eval_transform(backend, request, tiny_data):
    index = index_split(tiny_data, "val")
    x, _, i = one_pass(make(backend, request))
    want = np.stack([np.asarray(eval_transform(SIZE)(decode_image(index.paths[k])), np.float64) for k in i.tolist()])
    err = np.abs(_pixels(x) - want).mean((1, 2, 3))  # (n,) per image
    assert err.mean() < TOLERANCE[backend], (backend, err.mean(), err.max())


@pytest.mark.dali
def test_dali_skips_unreadable_files(tiny_data, tmp_path, request):
    """A text file named .jpg (header unreadable: skipped by the feeder) and a JPEG whose body is garbage
    (the decoder fails: found by bisection) are listed in bad_files and missing from the indices; every
    other image comes once. A split of nothing but unreadable files is a DataError naming one."""
    root = tmp_path / "bad"
    shutil.copytree(tiny_data / "val", root / "val")
    cls = sorted((root / "val").iterdir())[0]
    good = next(cls.iterdir()).read_bytes()
    (cls / "y_corrupt.jpg").write_bytes(good[:200] + bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)))
    (cls / "z_text.jpg").write_text("not an image\n")
    index = index_split(root, "val")
    ld = make("dali", request, batch=8, root=root)
    _, y, i = one_pass(ld)
    flagged = {s.split(" (")[0] for s in ld.bad_files}
    assert flagged == {str(cls / "y_corrupt.jpg"), str(cls / "z_text.jpg")}
    readable = {k for k, p in enumerate(index.paths) if p not in flagged}
    assert set(i.tolist()) == readable and y.tolist() == [index.labels[k] for k in i.tolist()]
    junk = tmp_path / "junk" / "val" / "a"
    junk.mkdir(parents=True)
    for k in range(3):
        (junk / f"{k}.jpg").write_text("no")
    with pytest.raises(DataError, match=str(junk / "0.jpg")):
        one_pass(make("dali", request, root=tmp_path / "junk"))
