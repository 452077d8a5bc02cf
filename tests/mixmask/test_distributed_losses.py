"""The gathered losses under 2-process DDP (gloo, CPU) equal one process on the concatenated batch.

tests/mixmask/dist_gather_worker.py does the work (see its docstring): SimCLR and Barlow Twins, loss and
every parameter gradient against the one-process reference, plus a negative control with a gather whose
backward does not sum over ranks (it must be caught), a MoCo v2 smoke run with its gathers, and CMAE with
the InfoNCE contrastive loss (keys gathered without gradient, every gathered key a negative) against one
process, with two negative controls (keys not gathered; positives not offset by the rank).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "mixmask" / "dist_gather_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist_losses")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(WORKER), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("name", ["simclr", "barlow_twins"])
def test_ddp_gradients_equal_one_process(result, name):
    r = result[name]
    # DDP left the same averaged gradient on both ranks
    assert r["rank_grad_spread"] == 0.0
    # every parameter's gradient equals the one-process gradient on the concatenated batch
    g = r["grads"]
    assert g["n_params"] > 10
    assert g["allclose"], g
    assert g["max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs_grad"]), g
    assert r["max_abs_grad"] > 1e-3  # the gradients are not trivially zero


def test_simclr_loss_is_mean_of_ranks(result):
    r = result["simclr"]
    a, b = r["rank_losses"]
    assert a != b  # each rank's loss is over its own anchors
    assert (a + b) / 2 == pytest.approx(r["reference_loss"], rel=1e-5, abs=1e-6)


def test_barlow_twins_loss_is_global(result):
    r = result["barlow_twins"]
    for loss in r["rank_losses"]:
        assert loss == pytest.approx(r["reference_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["simclr", "barlow_twins"])
def test_negative_control_broken_gather_is_caught(result, name):
    """A gather whose backward does not sum over ranks: same loss, wrong gradients (the test has teeth)."""
    r, broken = result[name], result[name]["broken"]
    assert broken["rank_losses"] == pytest.approx(r["rank_losses"], rel=1e-5, abs=1e-6)  # the forward is right
    assert not broken["grads"]["allclose"]
    # far outside the tolerance the correct gather meets
    assert broken["grads"]["max_abs_diff"] > 100 * max(r["grads"]["max_abs_diff"], 1e-6)


def test_moco_v2_runs_with_gathers(result):
    r = result["moco_v2"]
    assert r["finite_loss"] and r["finite_grads"] and r["nonzero_grads"], r
    assert r["queue_ptr"] == 8  # both ranks' 4 keys were enqueued
    assert r["queue_same_on_ranks"]


def test_cmae_infonce_equals_one_process(result):
    r = result["cmae"]
    assert r["target_params_trainable"] == 0  # the keys come from the frozen momentum encoder
    # each rank's loss is the mean over its own samples, scored against all W N gathered keys
    a, b = r["rank_loss_con"]
    assert a != b
    assert (a + b) / 2 == pytest.approx(r["reference_loss_con"], rel=1e-5, abs=1e-6)
    assert sum(r["rank_losses"]) / 2 == pytest.approx(r["reference_loss"], rel=1e-5, abs=1e-6)
    # DDP left the same averaged gradient on both ranks, equal to the one-process gradient
    assert r["rank_grad_spread"] == 0.0
    g = r["grads"]
    assert g["n_params"] > 10
    assert g["allclose"], g
    assert g["max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs_grad"]), g
    assert r["max_abs_grad"] > 1e-3


@pytest.mark.parametrize("control", ["no_gather_loss_con", "no_offset_loss_con"])
def test_cmae_negative_controls_change_the_contrastive_loss(result, control):
    """Keys not gathered (the local N keys repeated W times instead of the W N), or the positive's row not
    offset by the rank: the test above would catch either, 100 times outside its tolerance (an untrained
    model's keys are all alike, so the loss moves little: near log(W N) whichever keys are scored)."""
    r = result["cmae"]
    wrong = sum(r[control]) / 2
    assert abs(wrong - r["reference_loss_con"]) > 100 * 1e-5 * max(1.0, abs(r["reference_loss_con"])), (wrong, r)
    if control == "no_offset_loss_con":  # rank 0's offset is 0 anyway: only rank 1 is wrong
        assert r[control][0] == pytest.approx(r["rank_loss_con"][0], rel=1e-6, abs=1e-7)
        assert r[control][1] != pytest.approx(r["rank_loss_con"][1], rel=1e-4, abs=1e-5)
    else:
        for got, right in zip(r[control], r["rank_loss_con"]):
            assert got != pytest.approx(right, rel=1e-4, abs=1e-5)
