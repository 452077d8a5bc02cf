"""CUDA float kernels (kernels/fill_cuda.py) in numba's CUDA simulator, against the numpy references of
kernels/fill.py.

NUMBA_ENABLE_CUDASIM=1 must be set before numba.cuda is imported, so all cases run in one fresh
process (fill_cudasim_worker.py, shapes kept tiny: the simulator runs a Python thread per CUDA
thread); each case is reported as its own test here. The noise must equal the reference bit for bit
(the simulator uses Python math), mixup exactly, high_pass to 1e-5 (the reference sums in float64).
"""
import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fill_cudasim_worker.py")

# noise: N, C, H, W, Cm, g, box (sample 0; null: none), layout, seed, epoch, batch_index, stream
CASES = [
    ("noise", [2, 3, 5, 6, 1, 3, None, "nchw", 123, 0, 0, 1]),                  # spatial masks, g ∤ H
    ("noise", [2, 3, 7, 9, 3, 4, None, "nchw", 2 ** 64 - 5, 3, 17, 2]),         # channel-wise, big seed
    ("noise", [2, 3, 6, 7, 1, 2, [1, 2, 3, 4], "nchw", 9, 1, 2, 1]),            # focal window
    ("noise", [2, 3, 5, 8, 3, 3, [0, 1, 4, 5], "channels_last", 42, 2, 5, 2]),  # channels_last strides
    ("noise", [2, 3, 7, 6, 1, 3, None, "channels_last", 7, 0, 1, 1]),
    ("high_pass", [2, 3, 5, 6, 3, 1.0, "nchw"]),
    ("high_pass", [2, 3, 6, 7, 5, 2.0, "nchw"]),
    ("high_pass", [2, 3, 5, 8, 5, 5.0, "channels_last"]),
    ("mixup", [3, 3, 5, 6, "nchw"]),
    ("mixup", [2, 3, 5, 7, "channels_last"]),
    ("host", []),
    ("overlap", []),
]
IDS = [f"{k}-" + "-".join(map(str, a)).replace(" ", "") for k, a in CASES]


@pytest.fixture(scope="module")
def sim_results(run_python):
    payload = json.dumps([{"id": i, "kind": k, "args": a} for i, (k, a) in zip(IDS, CASES)])
    proc = run_python(WORKER, {"NUMBA_ENABLE_CUDASIM": "1"}, stdin=payload, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", IDS)
def test_cuda_simulator_matches_reference(sim_results, case_id):
    assert sim_results[case_id] == "ok", sim_results[case_id]
