"""Progressive resolution (data.size_start, size_ramp, size_step; mixmask/resolution.py) and the evaluation side
(data.eval_size): the schedule against FFCV's formula, the config checks, the mixers' grids at every side, each
backend's views at the scheduled side (pixel-equal to a fixed-size loader at that side), the evaluation loaders
at data.eval_size, and exact resume across a size change end to end on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loaders.folder import index_split
from loaders.torchvision_backend import AugParams
from mixmask.config import ConfigError, load_config
from mixmask.mixing import MIXERS, MixMask, MixStage
from mixmask.resolution import grid_at, view_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the loaders' schedule: 16 px at epoch 0, 24 px at epoch 1, 32 px from epoch 2; MixMask cells of 32 / 4 = 8 px
PROGRESSIVE = AugParams(32, size_start=16, size_ramp=(0.0, 2.0), size_step=8)
BACKENDS = [pytest.param("torchvision", None, id="torchvision"),
            pytest.param("dali", "nvidia.dali", marks=pytest.mark.dali, id="dali"),
            pytest.param("ffcv", "ffcv", marks=[pytest.mark.ffcv, pytest.mark.filterwarnings(
                "ignore::pytest.PytestUnraisableExceptionWarning")], id="ffcv")]


def ffcv_size(epoch, lo, hi, r0, r1, step):
    """FFCV's ImageNet example (get_resolution), rounding DOWN to a multiple of step as data.size_step does."""
    if epoch <= r0:
        return lo
    if epoch >= r1:
        return hi
    return int(np.interp([epoch], [r0, r1], [lo, hi])[0] // step) * step


@pytest.mark.parametrize("lo,hi,ramp,step", [(160, 192, (65, 76), 32), (160, 224, (10, 30.5), 16),
                                             (16, 32, (0, 2), 8), (24, 32, (3, 3), 8), (96, 224, (0, 40), 32)])
def test_view_size_is_ffcvs_interpolation_rounded_down(lo, hi, ramp, step):
    for epoch in range(90):
        assert view_size(epoch, hi, lo, ramp, step) == ffcv_size(epoch, lo, hi, *ramp, step), epoch
    assert all(view_size(e, hi, 0, ramp, step) == hi for e in range(90))  # size_start 0: off
    assert PROGRESSIVE.size_at(0) == 16 and PROGRESSIVE.size_at(1) == 24 and PROGRESSIVE.size_at(2) == 32


def test_grid_keeps_the_cell():
    assert [grid_at(4, 32, s) for s in (16, 24, 32)] == [2, 3, 4]  # 8-px cells
    assert grid_at(8, 224, 168) == 6 and grid_at(7, 0, 99) == 7  # full size 0: the grid follows the image


ON = ["data.image_size=32", "mask.grid=4", "mask.kind=discrete", "data.size_start=16", "data.size_step=8",
      "data.size_ramp=[0,2]"]  # 16, 24, 32 px: 2, 3, 4 cells of 8 px


@pytest.mark.parametrize("extra,needle", [
    (["data.size_start=40"], "data.size_start=40 must be 0"),
    (["data.size_start=4"], "data.size_start=4 must be 0"),
    (["data.size_ramp=[3,1]"], "data.size_ramp"),
    (["data.size_ramp=[-1,1]"], "data.size_ramp"),
    (["data.size_step=0"], "data.size_step"),
    (["data.size_step=16", "data.size_start=24"], "data.size_start=24 is not a multiple of data.size_step"),
    (["mask.grid=3"], "mask.grid=3 does not divide data.image_size=32"),
    (["data.size_step=4", "data.size_start=12"], "data.size_start=12 is not a multiple of the 8-px cell"),
    (["data.size_step=4"], "data.size_step=4 is not a multiple of the 8-px cell of mask.grid"),
    (["mask.kind=block"], "mask.kind=block needs >= 3"),  # its generator places nothing on 2 x 2 cells
    (["data.size_start=8"], "mask.kind=discrete needs >= 2"),
    (["mask.method=mscn", "mscn.grid=3"], "mscn.grid=3 does not divide"),
    (["mask.method=saliency", "mscn.grid=5"], "mscn.grid=5 does not divide"),
    (["model.arch=vit_tiny", "model.patch_size=8"], "data.size_start=16 with model.arch=vit_tiny"),
    (["data.eval_size=4"], "data.eval_size=4"),
    (["data.size_start=0", "model.arch=vit_tiny", "model.patch_size=8", "data.eval_size=16"],
     "data.eval_size=16 with model.arch=vit_tiny"),
])
def test_config_errors_name_the_key(extra, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_config([], ON + extra)


@pytest.mark.parametrize("extra", [[], ["mask.kind=block", "data.size_start=24"], ["mask.method=unmix"], ["mask.enabled=false", "mask.grid=3"],
                                   ["mask.method=mscn", "mscn.grid=4"], ["data.eval_size=48"],
                                   ["data.size_start=0", "mask.grid=3", "data.size_step=5"]])
def test_configs_that_load(extra):
    cfg = load_config([], ON + extra)
    assert cfg.data.size_ramp == (0.0, 2.0)


GRIDDED = {"mixmask": lambda m: [m], "saliency_mixmask": lambda m: [m], "unmix_mixmask": lambda m: [m.mixmask],
           "mscn": lambda m: [m], "saliency": lambda m: [m.mscn], "unmix": lambda m: []}  # the parts with a grid


@pytest.mark.parametrize("method", sorted(MIXERS))
def test_every_mixer_keeps_its_cells_at_every_side(method):
    """Each mixer at 16, 24 and 32 px views under progressive resolution: the grids have 8-px cells (s / 8 a
    side), the MixMask views are the exact cell-aligned select, the output keeps the views' side."""
    from mixmask import masks as mk

    extra = ["mscn.grid=4"] if "mscn" in MIXERS[method].sections else []
    cfg = load_config([], ON + [f"mask.method={method}", *extra])
    mixer = MIXERS[method].from_config(cfg)
    st = MixStage(MEAN, STD, dtype=torch.float32, channels_last=False, mixer=mixer, route="torch")
    gen = torch.Generator().manual_seed(0)
    for s in (16, 24, 32):
        v1, v2 = (torch.randint(0, 256, (8, s, s, 3), dtype=torch.uint8, generator=gen) for _ in range(2))
        b = st(v1, v2, torch.zeros(8, dtype=torch.long), torch.arange(8), 0, s)
        assert b.x1.shape == b.x2.shape == (8, 3, s, s)
        for part in GRIDDED[method](mixer):
            assert part.grid_for(v1) == s // 8, (method, s)
        for m in b.mixes:
            assert m.x.shape == (8, 3, s, s)
            if m.method in ("mixmask", "saliency_mixmask"):
                assert m.mask.shape[-2:] == (s // 8, s // 8)
                keep = mk.upsample(m.mask.cpu(), s, s).bool()[:, None]  # (1 or N, 1, s, s)
                want = torch.where(keep, b.x1, b.x1[m.perm])
                assert torch.equal(m.x, want)
                assert torch.allclose(m.lam, keep.float().mean((1, 2, 3)).expand(8))


# ---------------------------------------------------------------------------------------------- the backends

def _stage(full_size: int, grid: int) -> MixStage:
    return MixStage(MEAN, STD, dtype=torch.float32, channels_last=True,
                    mixer=MixMask(grid=grid, kind="discrete", full_size=full_size))


def _loader(backend, tiny_data, tiny_betons, aug, st, views=2):
    index = index_split(tiny_data, "train")
    if backend == "dali":
        from loaders.dali_backend import DaliTrainLoader

        return DaliTrainLoader(index, aug, st, 16, threads=1, prefetch=2, views=views)
    if backend == "ffcv":
        from loaders.ffcv_backend import FfcvTrainLoader

        return FfcvTrainLoader(tiny_betons / "train.beton", aug, st, 16, workers=1, views=views)
    from loaders.torchvision_backend import TorchvisionTrainLoader

    return TorchvisionTrainLoader(index, aug, st, 16, workers=0, views=views)


def _epoch(ld, epoch, start=0):
    ld.set_epoch(epoch, start)
    return list(ld)


@pytest.mark.parametrize("backend,module", BACKENDS)
def test_loader_follows_the_schedule(backend, module, tiny_data, request):
    """Two-view and one-view loaders make epoch e's views at PROGRESSIVE.size_at(e) (16, 24, 32 px); at 24 px
    they are the fixed 24-px loader's views pixel for pixel (same windows, same masks: 3 x 3 cells of 8 px)."""
    if module:
        pytest.importorskip(module)
    betons = request.getfixturevalue("tiny_betons") if backend == "ffcv" else None
    grow = _loader(backend, tiny_data, betons, PROGRESSIVE, _stage(32, 4))
    fixed = _loader(backend, tiny_data, betons, AugParams(24), _stage(0, 3))
    one = _loader(backend, tiny_data, betons, PROGRESSIVE, MixStage(MEAN, STD, dtype=torch.float32), views=1)
    for epoch, side in ((0, 16), (1, 24), (2, 32)):
        got = _epoch(grow, epoch)
        assert len(got) == 5 and all(b.x1.shape[-2:] == b.x2.shape[-2:] == (side, side) for b in got)
        assert all(b.mixes[0].mask.shape[-1] == side // 8 for b in got)
        if epoch == 1:
            ref = _epoch(fixed, 1)
            for a, b in zip(got, ref):
                assert torch.equal(a.index, b.index) and torch.equal(a.x1, b.x1) and torch.equal(a.x2, b.x2)
                assert torch.equal(a.mixes[0].x, b.mixes[0].x) and torch.equal(a.mixes[0].lam, b.mixes[0].lam)
            single = _epoch(one, 1)
            assert all(s.x2 is None and torch.equal(s.x1, a.x1) for s, a in zip(single, got))
    assert _epoch(one, 0)[0].x1.shape[-2:] == (16, 16)


@pytest.mark.parametrize("backend,module", BACKENDS)
def test_evaluation_loaders_use_eval_size(backend, module, tiny_data, request):
    import train

    if module:
        pytest.importorskip(module)
    from accelerate import Accelerator

    extra = [f"data.beton_dir={request.getfixturevalue('tiny_betons')}"] if backend == "ffcv" else []
    cfg = load_config([], ON + [f"data.root={tiny_data}", f"data.backend={backend}", "data.eval_size=24",
                                "data.workers=1", "data.batch_size=16", *extra])
    ld = train.eval_loader(cfg, Accelerator(cpu=True), tiny_data, "val")
    x, labels, index = next(iter(ld))
    assert x.shape == (16, 3, 24, 24) and labels.shape == index.shape == (16,)


@pytest.mark.parametrize("backend,module", BACKENDS)
def test_progressive_resolution_resumes_exactly(backend, module, tiny_data, tmp_path, request):
    """train.py at 24 px in epoch 0 and 32 px in epoch 1 (kNN at data.eval_size=24), interrupted one step after
    the size change and resumed: the next losses and the final weights equal the uninterrupted run's.

    Two runs instead of three: the interrupted run is the uninterrupted run's folder as a stop after step 6
    leaves it (checkpoint-00000006 is the newest, metrics up to step 6), and the resume is a new process."""
    import json
    import shutil

    from safetensors.torch import load_file

    from trainrun import TINY, read_metrics, run_train

    if module:
        pytest.importorskip(module)
    extra = [] if backend == "torchvision" else ["data.workers=1"]
    if backend == "ffcv":  # the session's .beton files of tiny_data: nothing is written
        extra.append(f"data.beton_dir={request.getfixturevalue('tiny_betons')}")
    args = lambda name: [*TINY, f"data.root={tiny_data}", f"run.out_dir={tmp_path}", f"run.name={name}",  # noqa: E731
                         f"data.backend={backend}", "data.size_start=24", "data.size_ramp=[0,1]", "data.size_step=8",
                         "data.eval_size=24", "run.checkpoint_every=6", "run.max_steps=8", *extra]
    full = run_train(*args("full"))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "progressive resolution: 24 px epoch 0, 32 px epoch 1" in full.stderr
    cut = tmp_path / "cut"  # 5 steps an epoch: stopped after the first 32-px step
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoint-00000008")
    (cut / "latest").write_text("checkpoint-00000006\n")
    kept = [m for m in read_metrics(cut) if m["step"] <= 6]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    second = run_train(*args("cut"))
    assert second.returncode == 0 and f"resumed from {cut / 'checkpoint-00000006'}" in second.stderr, second.stderr[-3000:]
    ref = {m["step"]: m for m in read_metrics(tmp_path / "full") if "loss" in m}
    got = {m["step"]: m for m in read_metrics(cut) if "loss" in m}
    assert sorted(got) == list(range(1, 9))
    for step in (7, 8):
        assert got[step]["lr"] == ref[step]["lr"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-5)
    assert ref[5]["loss_mix"] != ref[5]["loss_clean"]  # 3 x 3 cells at 24 px: the masks are not empty
    a = load_file(str(tmp_path / "full" / "checkpoint-00000008" / "model.safetensors"))
    b = load_file(str(cut / "checkpoint-00000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
