"""The DALI backend on the CPU (device_id=None): batches, sharding, determinism, resume, MixMask, one-view
loaders, label subsets, bad input, the pre-flight check, and statistical equivalence with the torchvision
baseline (the evaluation loader: test_eval_loaders.py)."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install '.[dali]')")
pytestmark = pytest.mark.dali

from loaders.dali_backend import DaliTrainLoader, _train_pipeline, _VIEW_INPUTS, find_undecodable, header_size  # noqa: E402,E501
from mixmask.mixing import MixMask, MixStage  # noqa: E402
from loaders.folder import index_split  # noqa: E402
from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader  # noqa: E402
from loaders.view_params import draw_views  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def stage(enabled=True, dtype=torch.float32, **kw):
    mix = {k: kw.pop(k) for k in ("kind", "ratio", "per_sample", "partner") if k in kw}
    return MixStage(MEAN, STD, dtype=dtype, channels_last=True, mixer=MixMask(grid=4, **mix) if enabled else None, **kw)


def loader(root, batch=16, rank=0, world=1, seed=0, aug=None, st=None, threads=1):
    return DaliTrainLoader(index_split(root, "train"), aug or AugParams(32), st or stage(), batch, rank, world,
                           threads=threads, prefetch=2, seed=seed)


def take(ld, epoch=0, start=0):
    ld.set_epoch(epoch, start)
    return list(ld)


def test_batches_shapes_dtype_layout_labels(tiny_data):
    ld = loader(tiny_data, st=stage(dtype=torch.bfloat16))
    index = index_split(tiny_data, "train")
    batches = take(ld)
    assert len(batches) == len(ld) == 80 // 16
    for b in batches:
        for x in (b.x1, b.x2, b.mixed):
            assert x.shape == (16, 3, 32, 32) and x.dtype == torch.bfloat16
            assert x.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.dtype == torch.int64 and b.perm.dtype == torch.int64 and b.lam.shape == (16,)
        assert b.labels.tolist() == [index.labels[i] for i in b.index.tolist()]
    assert not torch.equal(batches[0].x1, batches[0].x2)  # two different views of the same images
    seen = torch.cat([b.index for b in batches])
    assert len(set(seen.tolist())) == 80  # 80 images, batch 16: every sample once


def test_sharding_two_ranks_exact(tiny_data):
    """Two ranks, batch 16, 80 images: 2 batches each (64 used), disjoint, the same set as world=1 cut."""
    per_rank = [torch.cat([b.index for b in take(loader(tiny_data, rank=r, world=2), epoch=3)]) for r in (0, 1)]
    assert [len(p) for p in per_rank] == [32, 32]
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
    from loaders.sharding import shard_indices

    for r in (0, 1):  # the same shards as every backend (loaders/sharding.py)
        want = shard_indices(80, r, 2, 16, seed=0, epoch=3, shuffle=True, drop_last=True)
        assert per_rank[r].tolist() == want.tolist()


def test_deterministic_epoch_order_and_resume(tiny_data):
    a = take(loader(tiny_data), epoch=1)
    b = take(loader(tiny_data, threads=2), epoch=1)  # other thread count, same views
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.x1, y.x1) and torch.equal(x.mixed, y.mixed)
    other = take(loader(tiny_data), epoch=2)
    assert not torch.equal(a[0].index, other[0].index)
    resumed = take(loader(tiny_data), epoch=1, start=3)  # resume at batch 3 of epoch 1
    assert len(resumed) == len(a) - 3
    for x, y in zip(a[3:], resumed):
        assert torch.equal(x.index, y.index) and torch.equal(x.x2, y.x2) and torch.equal(x.lam, y.lam)
    assert not torch.equal(take(loader(tiny_data, seed=1), epoch=1)[0].x1, a[0].x1)


def test_pipeline_reused_across_epochs_and_rebuilt_after_a_break(tiny_data):
    """One loader over epochs 0, 1 (prefetching across the boundary, one pipeline), then a pass of
    epoch 2 cut after 2 batches and epoch 2 again: the same batches as fresh loaders give."""
    ld = loader(tiny_data)
    take(ld, epoch=0)
    pipe = ld.pipe
    e1 = take(ld, epoch=1)
    assert ld.pipe is pipe  # epoch 1 continued the same pipeline
    ld.set_epoch(2)
    for k, _ in enumerate(ld):
        if k == 1:
            break
    e2 = take(ld, epoch=2)
    for got, fresh in ((e1, take(loader(tiny_data), epoch=1)), (e2, take(loader(tiny_data), epoch=2))):
        assert len(got) == len(fresh)
        for x, y in zip(got, fresh):
            assert torch.equal(x.index, y.index) and torch.equal(x.x1, y.x1) and torch.equal(x.mixed, y.mixed)


def test_one_view_is_view_0_of_two(tiny_data):
    """views=1: the pipeline makes view 0 only, equal bit for bit to x1 of views=2; x2 is None."""
    one = take(DaliTrainLoader(index_split(tiny_data, "train"), AugParams(32), stage(False), 16, threads=1, seed=4,
                               views=1), epoch=1)
    two = take(loader(tiny_data, seed=4, st=stage(False)), epoch=1)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert a.x2 is None and torch.equal(a.index, b.index) and torch.equal(a.x1, b.x1)


def test_label_subset_same_samples_as_torchvision(tiny_data, label_subset):
    """indices: Batch.index are folder positions of the subset, each at most once, batch for batch the
    torchvision backend's (the same seed and epoch)."""
    index, subset = index_split(tiny_data, "train"), label_subset
    d = take(DaliTrainLoader(index, AugParams(16), stage(False), 8, threads=1, seed=2, views=1, indices=subset), 3)
    t = take(TorchvisionTrainLoader(index, AugParams(16), stage(False), 8, workers=0, seed=2, views=1,
                                    indices=subset), 3)
    got = torch.cat([b.index for b in d]).tolist()
    assert len(d) == 4 and len(set(got)) == 32 and set(got) <= set(subset.tolist())
    assert [b.index.tolist() for b in d] == [b.index.tolist() for b in t]
    assert all(b.labels.tolist() == [index.labels[i] for i in b.index.tolist()] for b in d)


def test_mixmask_pixels_from_the_right_source(tiny_data):
    st = stage(per_sample=True)
    b = take(loader(tiny_data, st=st))[0]
    g = b.mask.shape[-1]
    H = b.x1.shape[-1]
    cell = (torch.arange(H) * g) // H
    up = b.mask[:, cell][:, :, cell].bool()  # (N, H, W) nearest upsampling of each sample's mask
    want = torch.where(up[:, None], b.x1, b.x1[b.perm])
    assert torch.equal(b.mixed, want)
    assert torch.allclose(b.lam, up.float().mean((1, 2)))
    assert not torch.equal(b.mixed, b.x1)


def _fixed_view_pipeline(data, rois, flips):
    """A pipeline over one image with given crop windows and flips (no colour ops)."""
    n = len(rois)

    def src():
        out = [[data] * n, [np.full(2, 8, np.float32)] * n]  # bytes, the 8-px side
        for _ in range(2):
            params = {"roi": [np.asarray(r, np.float32) for r in rois], "flip": [np.int32(f) for f in flips],
                      "colour_on": [np.int32(0)] * n, "colour_m": [np.eye(3, dtype=np.float32)] * n,
                      "colour_cb": [np.array([1, 0], np.float32)] * n, "blur_on": [np.int32(0)] * n,
                      "sigma": [np.ones(1, np.float32)] * n, "solarize": [np.int32(0)] * n}
            out += [params[k] for k in _VIEW_INPUTS]
        return out
    p = _train_pipeline(src, n, 1, None, 0, 1, 0.65)
    p.build()
    return [t.as_array() for t in p.run()]


def test_crop_window_and_flip_orientation():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255          # right half white
    img[20:, :30] = 100        # bottom-left grey
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    data = np.frombuffer(buf.getvalue(), np.uint8)
    # roi = (y0, x0, y1, x1) as fractions
    v, _ = _fixed_view_pipeline(data, [(0, 0.55, 1, 1), (0, 0, 0.45, 0.45), (0.55, 0, 1, 0.45)], [0, 0, 0])
    assert (v[0] == 255).all() and (v[1] == 0).all() and (v[2] == 100).all()
    v, _ = _fixed_view_pipeline(data, [(0, 0, 1, 1)], [1])
    ref, _ = _fixed_view_pipeline(data, [(0, 0, 1, 1)], [0])
    assert np.array_equal(v[0], ref[0][:, ::-1])
    assert v[0][:, 0].mean() > 200 and v[0][:, -1].mean() < 120  # flipped: white on the left


def _save(path: Path, img: Image.Image, fmt="JPEG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


@pytest.fixture()
def odd_data(tiny_data, tmp_path) -> tuple[Path, list[Path]]:
    """The tiny set plus odd files: grayscale, CMYK, PNG, tiny, large JPEGs (usable) and a corrupt
    JPEG, a text file named .jpg and a truncated JPEG (may or may not decode)."""
    root = tmp_path / "odd"
    shutil.copytree(tiny_data, root)
    cls = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0]
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    _save(cls / "z_gray.jpg", rgb.convert("L"))
    _save(cls / "z_cmyk.jpg", rgb.convert("CMYK"))
    _save(cls / "z_png.jpg", rgb, "PNG")  # a PNG with a .jpg name
    _save(cls / "z_tiny.jpg", rgb.resize((3, 2)))
    _save(cls / "z_large.jpg", rgb.resize((2200, 1800)))
    bad = [cls / "z_corrupt.jpg", cls / "z_text.jpg"]
    good = (cls / "z_large.jpg").read_bytes()
    bad[0].write_bytes(good[:200] + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    bad[1].write_text("not an image\n")
    (cls / "z_trunc.jpg").write_bytes(good[: len(good) // 3])
    return root, bad


def test_bad_input_skipped_counted_never_fatal(odd_data):
    root, bad = odd_data
    index = index_split(root, "train")
    n = len(index)  # 88 files
    ld = DaliTrainLoader(index, AugParams(32), stage(), 8, threads=2, seed=0)
    for epoch in (0, 1):
        batches = take(ld, epoch=epoch)
        assert len(batches) == n // 8 and all(b.x1.shape[0] == 8 for b in batches)
        assert all(torch.isfinite(b.x1.float()).all() for b in batches)
    flagged = {s.split(" (")[0] for s in ld.bad_files}
    assert {str(p) for p in bad} <= flagged  # the undecodable ones are skipped and reported
    usable = {"z_gray.jpg", "z_cmyk.jpg", "z_png.jpg", "z_tiny.jpg", "z_large.jpg"}
    assert not {Path(p).name for p in flagged} & usable


def test_find_undecodable_lists_exactly_the_bad_files(odd_data):
    root, bad = odd_data
    paths = list(index_split(root, "train").paths)
    found = dict(find_undecodable(paths, threads=2, batch=16))
    assert {str(p) for p in bad} <= set(found)
    assert set(found) <= {str(p) for p in bad} | {str(bad[0].parent / "z_trunc.jpg")}
    assert all(found[str(p)] for p in bad)  # each with a reason


def test_crop_windows_match_torchvision_distribution():
    """Our RandomResizedCrop draws (kernels/views.py) against torchvision's get_params: area, aspect
    and centre distributions on a 500 x 375 image, and the fallback on a very wide one."""
    from torchvision.transforms import RandomResizedCrop

    W, H, n = 500, 375, 4000
    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.zeros(3, H, W), (0.2, 1.0), (3 / 4, 4 / 3))
                   for _ in range(n)])  # i j h w
    v = draw_views(AugParams(32), 0, 0, np.arange(n), np.tile([[W, H]], (n, 1)), view=0)
    y0, x0, y1, x1 = (v.roi * np.array([H, W, H, W])).T
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= W + 1e-3).all() and (y1 <= H + 1e-3).all()
    assert np.allclose(w, np.round(w), atol=1e-3) and np.allclose(h, np.round(h), atol=1e-3)  # whole px
    area_tv, area = tv[:, 2] * tv[:, 3] / (W * H), w * h / (W * H)
    asp_tv, asp = np.log(tv[:, 3] / tv[:, 2]), np.log(w / h)
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    for a, b in ((area_tv, area), (asp_tv, asp)):
        assert np.allclose(np.quantile(a, qs), np.quantile(b, qs), atol=0.03)
    cx_tv, cx = (tv[:, 1] + tv[:, 3] / 2) / W, (x0 + w / 2) / W
    assert abs(cx_tv.mean() - cx.mean()) < 0.01 and abs(cx.mean() - 0.5) < 0.01
    wide = draw_views(AugParams(32, crop_scale=(0.99, 1.0)), 0, 0, np.arange(50), np.tile([[1000, 100]], (50, 1)), 0)
    assert np.allclose(wide.roi[:, [0, 2]], [0, 1])  # fallback: full height, width clamped to ratio 4/3
    assert np.allclose((wide.roi[:, 3] - wide.roi[:, 1]) * 1000, 133, atol=0.51)


def test_view_parameters_follow_the_recipe():
    aug = AugParams(32, jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.3)
    n = 4000
    v = draw_views(aug, 0, 0, np.arange(n), np.tile([[64, 48]], (n, 1)), view=0)
    for flag, p in ((v.jitter_on, 0.8), (v.gray, 0.2), (v.blur_on, 0.5), (v.solarize, 0.3), (v.flip, 0.5)):
        assert abs(flag.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert v.jitter[:, :3].min() >= 0.6 - 1e-6 and v.jitter[:, :3].max() <= 1.4 + 1e-6
    assert np.abs(v.jitter[:, 3]).max() <= 36 + 1e-4  # hue 0.1 of the circle = 36 degrees
    assert v.sigma.min() >= 0.1 and v.sigma.max() <= 2.0
    w = draw_views(aug, 0, 0, np.arange(n), np.tile([[64, 48]], (n, 1)), view=1)
    assert not np.array_equal(v.roi, w.roi)  # the two views are drawn independently
    again = draw_views(aug, 0, 0, np.arange(n)[::-1], np.tile([[64, 48]], (n, 1)), view=0)
    assert np.array_equal(again.roi[::-1], v.roi)  # keyed by index: order does not matter
    from kernels.color import colour_matrix

    for k in range(0, n, 397):  # the batched colour maps equal the per-sample definition
        on = v.jitter_on[k]
        want = colour_matrix(v.jitter[k, 2] if on else 1.0, v.jitter[k, 3] if on else 0.0, bool(v.gray[k]))
        assert np.allclose(v.colour_m[k], want, atol=1e-6)


def _view_stats(batches):
    x = torch.cat([b.x1.float() for b in batches])  # (N, 3, S, S) normalised
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    px = (x * std + mean) * 255  # back to 0-255
    per_img = px.mean((2, 3))  # (N, 3)
    gray = ((px[:, 0] - px[:, 1]).abs().amax((1, 2)) < 1.5) & ((px[:, 1] - px[:, 2]).abs().amax((1, 2)) < 1.5)
    return per_img.mean(0), per_img.std(0), px.std((2, 3)).mean(0), gray.float().mean()


def test_views_statistically_equivalent_to_torchvision(tiny_data):
    """Same images, same recipe: channel means, spreads and the grayscale share agree."""
    aug = AugParams(32, crop_scale=(0.2, 1.0))
    index = index_split(tiny_data, "train")
    st = stage(enabled=False)
    d, t = [], []
    for epoch in range(6):  # 6 x 80 = 480 views each
        d += take(DaliTrainLoader(index, aug, st, 16, threads=2, seed=epoch), epoch=epoch)
        tl = TorchvisionTrainLoader(index, aug, st, 16, workers=0, seed=epoch)
        t += take(tl, epoch=epoch)
    dm, ds, dsp, dg = _view_stats(d)
    tm, ts, tsp, tg = _view_stats(t)
    assert torch.allclose(dm, tm, atol=6.0), (dm, tm)      # mean colour of a view, 0-255
    assert torch.allclose(ds, ts, rtol=0.25), (ds, ts)     # spread of that mean across views
    assert torch.allclose(dsp, tsp, rtol=0.2), (dsp, tsp)  # within-view contrast
    assert abs(float(dg) - float(tg)) < 0.08 and abs(float(dg) - 0.2) < 0.08, (dg, tg)


@pytest.mark.parametrize("mode,kw", [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}),
                                     ("RGB", {"fmt": "PNG"}), ("RGB", {"fmt": "BMP"})])
def test_header_size_matches_pil(mode, kw):
    fmt = kw.pop("fmt", "JPEG")
    for w, h in ((1, 1), (37, 5), (640, 480), (3000, 17)):
        buf = io.BytesIO()
        Image.new(mode, (w, h), 90).save(buf, fmt, **kw)
        assert header_size(buf.getvalue()) == (w, h)


def test_header_size_rejects_malformed_headers():
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "JPEG")
    good = buf.getvalue()
    for bad in (good[:20], b"\xff\xd8\x00\x00" + good[4:], b"not an image at all", b""):
        with pytest.raises(Exception):
            header_size(bad)


def test_contrastive_crop_boxes_follow_table_updates(gradient_data):
    """The feeder passes each image's box of the current table: epoch 0 with the table inactive is
    plain RandomResizedCrop; after an in-place update the views of epoch 1 are cropped around the new
    boxes (the pipeline, which had prefetched epoch 1 with the old table, is rebuilt once), as
    kernels/views.py predicts. A pass with an unchanged table reuses the pipeline."""
    from ccrop_checks import AUG, check_epoch, raw_stage, take as take_raw, update_table
    from mixmask.crops import BoxTable

    index = index_split(gradient_data, "train")
    table = BoxTable(len(index))
    ld = DaliTrainLoader(index, AUG, raw_stage, 8, threads=2, prefetch=2, seed=5, boxes=table)
    check_epoch(take_raw(ld, 0), 5, 0)
    update_table(table)
    pipe = ld.pipe
    check_epoch(take_raw(ld, 1), 5, 1, box=table.array[0], alpha=AUG.crop_alpha)
    assert ld.pipe is not pipe  # rebuilt: its prefetched batches had the old boxes
    pipe = ld.pipe
    check_epoch(take_raw(ld, 2), 5, 2, box=table.array[0], alpha=AUG.crop_alpha)
    assert ld.pipe is pipe  # unchanged table: the same pipeline goes on
