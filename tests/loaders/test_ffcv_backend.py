"""The FFCV backend on the CPU: the .beton writer, the decode-once two-view loader (batches, sharding,
determinism, resume, epochs, one view, label subsets), its agreement with the DALI views and the
torchvision statistics, and errors from FFCV's compiled stages surfacing in the main thread (the
evaluation loader: test_eval_loaders.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV not installed (pip install '.[ffcv]')")
# numba's dispatcher finalizers raise KeyError on FFCV's generated functions at garbage collection
# (printed as unraisable-exception warnings; harmless): silenced here only
pytestmark = [pytest.mark.ffcv, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

from mixmask.mixing import MixMask, MixStage  # noqa: E402
from loaders.ffcv_backend import FfcvTrainLoader, write_beton  # noqa: E402
from loaders.folder import DataError, index_split  # noqa: E402
from loaders.torchvision_backend import AugParams, TorchvisionTrainLoader  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def stage(enabled=True, **kw):
    mix = {k: kw.pop(k) for k in ("kind", "ratio", "per_sample", "partner") if k in kw}
    return MixStage(MEAN, STD, dtype=torch.float32, channels_last=True, mixer=MixMask(grid=4, **mix) if enabled else None, **kw)


@pytest.fixture(scope="module")
def beton(tiny_betons) -> Path:
    return tiny_betons / "train.beton"


def take(ld, epoch=0, start=0):
    ld.set_epoch(epoch, start)
    return list(ld)


def test_writer_counts_labels_modes_and_refuses_overwrite(tiny_data, tmp_path):
    index = index_split(tiny_data, "val")
    sizes = {}
    for mode in ("raw", "jpg", "proportion"):
        out = tmp_path / f"{mode}.beton"
        f = write_beton(tiny_data, "val", out, write_mode=mode, workers=2, progress=False)
        assert f["samples"] == len(index) == 40 and f["classes"] == 10 and f["skipped"] == []
        assert f["bytes"] == out.stat().st_size > 0
        sizes[mode] = f["bytes"]
    with pytest.raises(DataError, match="exists"):
        write_beton(tiny_data, "val", tmp_path / "jpg.beton", progress=False)
    write_beton(tiny_data, "val", tmp_path / "jpg.beton", overwrite=True, max_resolution=16, progress=False)
    from ffcv.reader import Reader

    r = Reader(str(tmp_path / "jpg.beton"))
    assert r.metadata["f0"]["width"].max() <= 16 and r.metadata["f0"]["height"].max() <= 16
    assert np.array_equal(np.asarray(r.metadata["f1"]).astype(int), index.labels)


@pytest.mark.parametrize("mode,tol", [("raw", 0.0), ("jpg", 5.0)])  # jpg: 3.2 measured (32 px, sharp edges)
def test_writer_round_trips_images(tiny_data, tmp_path, mode, tol):
    """Images read back from the .beton equal the originals: raw exactly, jpg (re-encoded at q90)
    within `tol` levels on average; labels and indices in folder order."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from PIL import Image

    out = tmp_path / f"{mode}.beton"
    write_beton(tiny_data, "val", out, write_mode=mode, progress=False)
    index = index_split(tiny_data, "val")
    ld = Loader(str(out), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]})
    k = 0
    for imgs, labels, idx in ld:
        for img, lab, i in zip(imgs, labels.reshape(-1), idx.reshape(-1)):
            ref = np.asarray(Image.open(index.paths[int(i)]).convert("RGB"), np.int16)
            err = np.abs(img.astype(np.int16) - ref)
            assert (err.max() == 0) if tol == 0 else (err.mean() < tol), (mode, err.mean())
            assert int(i) == k and int(lab) == index.labels[k]
            k += 1
    assert k == len(index)


def test_mixmask_pixels_from_the_right_source(beton):
    b = take(FfcvTrainLoader(beton, AugParams(32), stage(per_sample=True), 16, workers=2))[0]
    H = b.x1.shape[-1]
    cell = (torch.arange(H) * b.mask.shape[-1]) // H
    up = b.mask[:, cell][:, :, cell].bool()  # (N, H, W)
    assert torch.equal(b.mixed, torch.where(up[:, None], b.x1, b.x1[b.perm]))
    assert torch.allclose(b.lam, up.float().mean((1, 2))) and not torch.equal(b.mixed, b.x1)


def test_writer_skips_and_reports_bad_files(tiny_data, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tiny_data, root)
    cls = next(iter(sorted((root / "val").iterdir())))
    (cls / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    (cls / "text.jpg").write_text("hello")
    f = write_beton(root, "val", tmp_path / "v.beton", progress=False)
    assert f["samples"] == 40 and len(f["skipped"]) == 2
    assert all(("broken.jpg" in s or "text.jpg" in s) for s in f["skipped"])
    # a label subset naming a skipped file fails at construction, naming its folder position
    broken = index_split(root, "val").paths.index(str(cls / "broken.jpg"))
    with pytest.raises(DataError, match=rf"no sample at folder positions \[{broken}\]"):
        FfcvTrainLoader(tmp_path / "v.beton", AugParams(32), stage(), 4, indices=[0, 1, 2, broken, 8, 9, 10, 11])


def test_batches_labels_layout(beton, tiny_data):
    index = index_split(tiny_data, "train")
    ld = FfcvTrainLoader(beton, AugParams(32), stage(), 16, workers=2)
    batches = take(ld)
    assert len(batches) == len(ld) == 5
    for b in batches:
        for x in (b.x1, b.x2, b.mixed):
            assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.tolist() == [index.labels[i] for i in b.index.tolist()]
    assert len(set(torch.cat([b.index for b in batches]).tolist())) == 80
    assert not torch.equal(batches[0].x1, batches[0].x2)


def test_one_view_is_view_0_of_two(beton):
    """views=1: the decoder makes view 0 only, equal bit for bit to x1 of views=2; x2 is None."""
    one = take(FfcvTrainLoader(beton, AugParams(32), stage(False), 16, workers=2, seed=4, views=1), epoch=1)
    two = take(FfcvTrainLoader(beton, AugParams(32), stage(False), 16, workers=2, seed=4), epoch=1)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert a.x2 is None and torch.equal(a.index, b.index) and torch.equal(a.x1, b.x1)


def test_label_subset_same_samples_as_torchvision(beton, tiny_data, label_subset):
    """indices (folder positions, mapped to .beton samples by the index field): Batch.index are positions
    of the subset, each at most once, batch for batch the torchvision backend's; too few fail at once."""
    index = index_split(tiny_data, "train")
    f = take(FfcvTrainLoader(beton, AugParams(16), stage(False), 8, workers=2, seed=2, views=1,
                             indices=label_subset), 3)
    t = take(TorchvisionTrainLoader(index, AugParams(16), stage(False), 8, workers=0, seed=2, views=1,
                                    indices=label_subset), 3)
    got = torch.cat([b.index for b in f]).tolist()
    assert len(f) == 4 and len(set(got)) == 32 and set(got) <= set(label_subset.tolist())
    assert [b.index.tolist() for b in f] == [b.index.tolist() for b in t]
    assert all(b.labels.tolist() == [index.labels[i] for i in b.index.tolist()] for b in f)
    with pytest.raises(ValueError, match="batch_size"):
        FfcvTrainLoader(beton, AugParams(16), stage(False), 8, 0, 2, indices=label_subset[:15])


def test_sharding_determinism_resume_and_epochs(beton):
    from loaders.sharding import shard_indices

    for r in (0, 1):
        got = torch.cat([b.index for b in take(FfcvTrainLoader(beton, AugParams(32), stage(), 16, r, 2), epoch=3)])
        assert got.tolist() == shard_indices(80, r, 2, 16, seed=0, epoch=3, shuffle=True, drop_last=True).tolist()
    ld = FfcvTrainLoader(beton, AugParams(32), stage(), 16, workers=1)
    e0, e1 = take(ld, 0), take(ld, 1)  # one loader, two epochs: the epoch reaches the compiled decoder
    other = FfcvTrainLoader(beton, AugParams(32), stage(), 16, workers=2)
    f1 = take(other, 1)  # another worker count, a fresh loader
    for x, y in zip(e1, f1):
        assert torch.equal(x.index, y.index) and torch.equal(x.x1, y.x1) and torch.equal(x.mixed, y.mixed)
    assert not torch.equal(e0[0].index, e1[0].index)
    resumed = take(FfcvTrainLoader(beton, AugParams(32), stage(), 16, workers=2), epoch=1, start=2)
    assert len(resumed) == 3
    for x, y in zip(e1[2:], resumed):
        assert torch.equal(x.index, y.index) and torch.equal(x.x2, y.x2)


def test_decode_twice_gives_the_same_views(beton):
    """The FFCV-SSL layout (two pipelines over the image field, one decode per view) draws the same
    keyed views as the decode-once decoder: the benchmark compares equal work."""
    once = take(FfcvTrainLoader(beton, AugParams(32), stage(), 16, workers=2), epoch=1)
    twice = take(FfcvTrainLoader(beton, AugParams(32), stage(), 16, workers=2, decode_once=False), epoch=1)
    for x, y in zip(once, twice):
        assert torch.equal(x.index, y.index) and torch.equal(x.x1, y.x1) and torch.equal(x.x2, y.x2)


def test_views_match_dali_geometry(beton, tiny_data):
    """Same keyed parameters in both backends: with colour and blur off, FFCV's OpenCV resize and
    DALI's resize of the same crop windows agree to a few levels."""
    pytest.importorskip("nvidia.dali")
    from loaders.dali_backend import DaliTrainLoader

    aug = AugParams(32, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    f = take(FfcvTrainLoader(beton, aug, stage(False), 16, workers=2))
    d = take(DaliTrainLoader(index_split(tiny_data, "train"), aug, stage(False), 16, threads=2))
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    for a, b in zip(f, d):
        assert torch.equal(a.index, b.index)
        diff = ((a.x1 - b.x1) * std).abs()
        # the .beton holds the images re-encoded (JPEG q90), and the two resizers differ slightly
        assert diff.mean() < 6.0, diff.mean()


def test_views_statistically_equivalent_to_torchvision(beton, tiny_data):
    aug = AugParams(32)
    f, t = [], []
    for epoch in range(6):
        f += take(FfcvTrainLoader(beton, aug, stage(False), 16, workers=2, seed=epoch), epoch=epoch)
        t += take(TorchvisionTrainLoader(index_split(tiny_data, "train"), aug, stage(False), 16, workers=0,
                                         seed=epoch), epoch=epoch)

    def stats(bs):
        x = torch.cat([b.x1 for b in bs]) * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        per = x.mean((2, 3))
        gray = (x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1.5
        return per.mean(0), per.std(0), x.std((2, 3)).mean(0), gray.float().mean()
    (fm, fs, fsp, fg), (tm, ts, tsp, tg) = stats(f), stats(t)
    assert torch.allclose(fm, tm, atol=6.0) and torch.allclose(ds := fs, ts, rtol=0.25), (fm, tm, ds, ts)
    assert torch.allclose(fsp, tsp, rtol=0.2) and abs(float(fg) - float(tg)) < 0.08, (fsp, tsp, fg, tg)


def test_pipeline_errors_surface_in_the_main_thread(beton, tmp_path):
    """A broken .beton (image bytes overwritten) must raise a DataError here, not hang or die in a thread."""
    broken = tmp_path / "broken.beton"
    data = bytearray(beton.read_bytes())
    from ffcv.reader import Reader

    meta = Reader(str(beton)).metadata["f0"]
    for ptr in meta["data_ptr"][:40]:  # clobber the JPEG headers of half the images
        data[int(ptr):int(ptr) + 64] = b"\x00" * 64
    broken.write_bytes(bytes(data))
    ld = FfcvTrainLoader(broken, AugParams(32), stage(), 16, workers=1)
    ld.set_epoch(0)
    try:
        batches = list(ld)
    except DataError as e:
        assert "FFCV pipeline failed" in str(e)
    else:  # turbojpeg may decode garbage without complaint; then the batches must still be whole
        assert len(batches) == 5 and all(torch.isfinite(b.x1).all() for b in batches)


def test_unraisable_filter_drops_only_numbas_finalizer_keyerror(monkeypatch):
    """The hook installed with the loader hides numba's finalizer KeyError and passes everything else on."""
    import sys
    import types

    from loaders import ffcv_backend

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    ffcv_backend._install_unraisable_filter()
    ffcv_backend._install_unraisable_filter()  # idempotent: wraps once

    def raised_in(filename: str, exc: BaseException):
        ns: dict = {}
        exec(compile("def finalizer(e):\n    raise e\n", filename, "exec"), ns)
        try:
            ns["finalizer"](exc)
        except BaseException as e:  # noqa: BLE001
            return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)

    sys.unraisablehook(raised_in("/x/site-packages/numba/core/dispatcher.py", KeyError("sig")))
    other_file = raised_in("/x/site-packages/ffcv/loader.py", KeyError("sig"))
    other_type = raised_in("/x/site-packages/numba/core/dispatcher.py", ValueError("v"))
    sys.unraisablehook(other_file)
    sys.unraisablehook(other_type)
    assert seen == [other_file.exc_value, other_type.exc_value]


def test_contrastive_crop_boxes_follow_table_updates(gradient_data, tmp_path):
    """The compiled decoder reads the box table through its address: after an in-place update the
    SAME compiled pipeline crops epoch 1 around the new boxes, as kernels/views.py predicts (epoch 0,
    table inactive: plain RandomResizedCrop)."""
    from ccrop_checks import AUG, check_epoch, raw_stage, take as take_raw, update_table
    from mixmask.crops import BoxTable

    beton = tmp_path / "gradient.beton"
    write_beton(gradient_data, "train", beton, write_mode="raw", workers=1, progress=False)  # exact pixels
    table = BoxTable(len(index_split(gradient_data, "train")))
    ld = FfcvTrainLoader(beton, AUG, raw_stage, 8, workers=2, seed=5, boxes=table)
    check_epoch(take_raw(ld, 0), 5, 0)
    compiled = ld._loader
    update_table(table)
    check_epoch(take_raw(ld, 1), 5, 1, box=table.array[0], alpha=AUG.crop_alpha)
    assert ld._loader is compiled
