"""Every mixing method end to end through train.py: on the torchvision backend a cut + resumed run equals
the uninterrupted one (masks and noise are keyed by the step, not drawn from a global state), and the DALI
and FFCV backends train with every method (the device stage is shared by all three)."""

from __future__ import annotations

import json
import shutil

import pytest

from mixmask.mixing import MIXERS
from tests.test_train import tiny_args
from tests.trainrun import read_metrics, run_train

METHODS = sorted(MIXERS)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_resumes_exactly(tiny_data, tmp_path, method):
    m = (f"mask.method={method}",)
    full = run_train(*tiny_args(tiny_data, tmp_path, "full", *m, "run.max_steps=5"))
    assert full.returncode == 0, full.stderr[-3000:]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["config"]["mask"]["method"] == method and summary["steps"] == 5
    assert run_train(*tiny_args(tiny_data, tmp_path, "cut", *m, "run.max_steps=2")).returncode == 0
    second = run_train(*tiny_args(tiny_data, tmp_path, "cut", *m, "run.max_steps=5"))
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    ref = {r["step"]: r for r in read_metrics(tmp_path / "full") if "loss" in r}
    got = {r["step"]: r for r in read_metrics(tmp_path / "cut") if "loss" in r}
    for step in (3, 4, 5):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-5), (method, step)
    # the method's own loss parts are logged: a mixed view's credit where it makes one
    mixes = {"mixmask": 1, "unmix": 1, "unmix_mixmask": 1, "saliency_mixmask": 1, "mscn": 0, "saliency": 0}[method]
    assert ("loss_mix" in ref[5]) == bool(mixes)


@pytest.mark.parametrize("backend,module", [pytest.param("dali", "nvidia.dali", marks=pytest.mark.dali),
                                            pytest.param("ffcv", "ffcv", marks=pytest.mark.ffcv)])
def test_every_method_trains_on_backend(tiny_data, tmp_path, backend, module):
    pytest.importorskip(module, reason=f"{module} not installed (pip install '.[{backend}]')")
    root = tmp_path / "data"  # a private copy: the ffcv backend writes its .beton beside the images
    shutil.copytree(tiny_data, root)
    for method in METHODS:
        res = run_train(*tiny_args(root, tmp_path, method, f"data.backend={backend}", "data.workers=1",
                                   f"mask.method={method}", "run.max_steps=2"))
        assert res.returncode == 0, (method, res.stderr[-3000:])
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["config"]["data"]["backend"] == backend
        assert summary["config"]["mask"]["method"] == method


def test_saliency_from_the_models_own_encoder(tiny_data, tmp_path):
    """saliency.source=encoder: train.py hands MoCo's key encoder's feature map to the mixer; it trains and
    its masks differ from the spectral-residual run's (the losses differ from step 1 on)."""
    runs = {}
    for source in ("encoder", "spectral"):
        res = run_train(*tiny_args(tiny_data, tmp_path, source, "mask.method=saliency", f"saliency.source={source}",
                                   "run.max_steps=2"))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[source] = {r["step"]: r["loss"] for r in read_metrics(tmp_path / source) if "loss" in r}
    assert runs["encoder"][1] != runs["spectral"][1]
