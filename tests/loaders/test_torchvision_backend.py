"""The torchvision baseline backend: the Batch contract, determinism, resume position, MixMask, one-view
loaders and label subsets."""

from __future__ import annotations

import pytest
import torch

from mixmask.mixing import MixMask, MixStage
from loaders.folder import index_split
from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader
from mixmask import masks as mk
from mixmask.fused import normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_loader(root, workers=0, per_sample=False, dtype=torch.float32, seed=0):
    stage = MixStage(MEAN, STD, dtype=dtype, channels_last=True, seed=seed,
                     mixer=MixMask(kind="block", grid=4, ratio=0.5, per_sample=per_sample, partner="auto"))
    return TorchvisionTrainLoader(index_split(root, "train"), AugParams(24), stage, batch_size=16, workers=workers, seed=seed)


def test_batch_contract(tiny_data):
    loader = make_loader(tiny_data, dtype=torch.bfloat16)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 5  # 80 images / 16
    b = batches[0]
    for x in (b.x1, b.x2, b.mixed):
        assert x.shape == (16, 3, 24, 24) and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert b.perm.dtype == torch.int64 and b.lam.dtype == torch.float32 and b.lam.shape == (16,)
    assert b.labels.dtype == torch.int64
    index = index_split(tiny_data, "train")
    assert b.labels.tolist() == [index.labels[i] for i in b.index.tolist()]
    assert not torch.equal(b.x1, b.x2)  # two different views of each image


def test_deterministic_and_worker_count_independent(tiny_data):
    a, b = make_loader(tiny_data, workers=0), make_loader(tiny_data, workers=2)
    a.set_epoch(1)
    b.set_epoch(1)
    for ba, bb in zip(a, b):
        assert torch.equal(ba.index, bb.index)
        assert torch.equal(ba.x1, bb.x1) and torch.equal(ba.mixed, bb.mixed)


def test_start_batch_resumes_mid_epoch(tiny_data):
    loader = make_loader(tiny_data)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start_batch=3)
    tail = list(loader)
    assert len(tail) == 2
    for x, y in zip(full[3:], tail):
        assert torch.equal(x.index, y.index) and torch.equal(x.x2, y.x2) and torch.equal(x.mask, y.mask)


def test_mixed_view_comes_from_the_right_images(tiny_data):
    loader = make_loader(tiny_data, per_sample=True)
    loader.set_epoch(0)
    b = next(iter(loader))
    keep = mk.upsample(b.mask, 24, 24).bool()[:, None]  # (N, 1, H, W)
    expect = torch.where(keep, b.x1, b.x1[b.perm])
    assert torch.equal(b.mixed, expect)
    assert torch.allclose(b.lam, keep.float().mean(dim=(1, 2, 3)))
    assert all(b.perm[j] != j for j in range(16))


def test_views_are_normalised_uint8_pixels(tiny_data):
    """x1 holds exactly the normalised values of some uint8 image (no interpolation on the device)."""
    loader = make_loader(tiny_data)
    loader.set_epoch(0)
    b = next(iter(loader))
    lut = normalize(torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3), MEAN, STD)
    for c in range(3):
        assert torch.isin(b.x1[:, c].flatten(), lut[0, c].flatten()).all()


def test_crop_windows_are_the_keyed_ones(tiny_data):
    """The crop is kernels/views.py's window for (seed, epoch, index, view), resized as
    RandomResizedCrop does: with colour ops and flips off, every view equals that resized crop."""
    import numpy as np
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from ccrop_checks import raw_stage
    from loaders.torchvision_backend import KeyedView, decode_image

    aug = AugParams(24, jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.0)
    index = index_split(tiny_data, "train")
    ld = TorchvisionTrainLoader(index, aug, raw_stage, batch_size=16, workers=0, seed=3)
    ld.set_epoch(2)
    v1, v2, idx = next(iter(ld))
    for view, v in ((0, v1), (1, v2)):
        kv = KeyedView(aug, view, 3)
        for k, i in enumerate(idx.tolist()):
            img = decode_image(index.paths[i])
            y0, x0, h, w = kv.window(img.width, img.height, 2, i)
            want = TF.resized_crop(img, y0, x0, h, w, [24, 24], InterpolationMode.BILINEAR, antialias=True)
            assert np.array_equal(v[k].numpy(), np.asarray(want)), (view, i)


def test_contrastive_crop_update_reaches_persistent_workers(gradient_data):
    """Two persistent workers, started in epoch 0 (table inactive: plain RandomResizedCrop); the box
    table is then rewritten in place, and the same workers crop epoch 1 around the new boxes."""
    from ccrop_checks import AUG, check_epoch, raw_stage, take, update_table
    from mixmask.crops import BoxTable

    index = index_split(gradient_data, "train")
    table = BoxTable(len(index))
    ld = TorchvisionTrainLoader(index, AUG, raw_stage, batch_size=8, workers=2, seed=5, boxes=table)
    check_epoch(take(ld, 0), 5, 0)
    workers = [w.pid for w in ld.loader._iterator._workers]
    update_table(table)
    check_epoch(take(ld, 1), 5, 1, box=table.array[0], alpha=AUG.crop_alpha)
    assert [w.pid for w in ld.loader._iterator._workers] == workers  # the same processes


def test_one_view_is_view_0_of_two(tiny_data):
    """views=1 makes view 0 only: x1 equals bit for bit the x1 of views=2 (same seed, epoch, samples), x2 is
    None; the stage refuses a one-view batch when it has to mix."""
    index, aug = index_split(tiny_data, "train"), AugParams(24)
    one, two = (TorchvisionTrainLoader(index, aug, MixStage(MEAN, STD), 16, workers=0, seed=4, views=v) for v in (1, 2))
    for ld in (one, two):
        ld.set_epoch(1)
    pairs = list(zip(one, two))
    assert len(pairs) == 5
    for a, b in pairs:
        assert a.x2 is None and torch.equal(a.index, b.index) and torch.equal(a.x1, b.x1)
    with pytest.raises(ValueError, match="one-view"):
        make_loader(tiny_data).stage(torch.zeros(2, 24, 24, 3, dtype=torch.uint8), None, torch.zeros(2), None, 0, 0)


def test_label_subset_draws_folder_indices_of_the_subset(tiny_data, label_subset):
    """indices: each epoch is subset[shard_indices(len(subset))], so Batch.index are folder positions of
    the subset, each at most once; len = full batches of the subset; too few for a batch fails at once."""
    from loaders.sharding import shard_indices

    index, subset = index_split(tiny_data, "train"), label_subset
    ld = TorchvisionTrainLoader(index, AugParams(24), MixStage(MEAN, STD), 8, workers=0, seed=2, views=1,
                                indices=subset)
    ld.set_epoch(3)
    got = torch.cat([b.index for b in ld]).tolist()
    assert len(ld) == 4 and len(got) == 32 and len(set(got)) == 32 and set(got) <= set(subset.tolist())
    assert got == subset[shard_indices(33, 0, 1, 8, seed=2, epoch=3, shuffle=True, drop_last=True)].tolist()
    with pytest.raises(ValueError, match="batch_size"):  # at construction, not mid-epoch
        TorchvisionTrainLoader(index, AugParams(24), MixStage(MEAN, STD), 8, world=2, workers=0, indices=subset[:15])
    with pytest.raises(ValueError, match=r"\[0, 80\)"):
        TorchvisionTrainLoader(index, AugParams(24), MixStage(MEAN, STD), 8, workers=0, indices=[0, 80])
