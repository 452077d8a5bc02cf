"""CUDA kernels (kernels/mix_cuda.py) in numba's CUDA simulator, against the numpy reference.

NUMBA_ENABLE_CUDASIM=1 must be set before numba.cuda is imported, so all cases run in one fresh
process (cudasim_worker.py, shapes kept tiny: the simulator runs a Python thread per CUDA thread);
each case is reported as its own test here.
"""
import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("cudasim_worker.py")

CASES = []
for dtype in ("float32", "float16", "bfloat16"):
    for layout in ("channels_last", "nchw"):
        for masks in ("none", "per_batch", "per_sample"):
            CASES.append(("mix", [3, 8, 6, 4, "random", masks, dtype, layout]))  # odd N, g∤W, 8x6
for layout in ("channels_last", "nchw"):
    CASES.append(("mix", [1, 5, 7, 3, "identity", "per_sample", "bfloat16", layout]))  # N=1, g∤H,W
    CASES.append(("mix", [2, 3, 2, 4, "roll", "per_batch", "float16", layout]))        # g > H, W
# the vectorised kernels (W % 4 == 0): every dtype/layout/masking, g not dividing H or W, odd N,
# and the same shapes forced through the per-element kernels
for dtype in ("float32", "float16", "bfloat16"):
    for layout in ("channels_last", "nchw"):
        for masks in ("none", "per_batch", "per_sample"):
            CASES.append(("mix", [3, 5, 8, 3, "random", masks, dtype, layout, "vector"]))
        CASES.append(("mix", [2, 4, 12, 5, "roll", "per_sample", dtype, layout, "scalar"]))
for layout in ("channels_last", "nchw"):
    CASES.append(("mix", [1, 3, 4, 2, "identity", "per_batch", "float16", layout, "vector"]))  # N=1
CASES += [("rng", [0, 0, 0]), ("rng", [2 ** 64 - 1, 2 ** 32 - 1, 17]), ("host", [])]
IDS = [f"{k}-" + "-".join(map(str, a)) for k, a in CASES]


@pytest.fixture(scope="module")
def sim_results(run_python):
    payload = json.dumps([{"id": i, "kind": k, "args": a} for i, (k, a) in zip(IDS, CASES)])
    proc = run_python(WORKER, {"NUMBA_ENABLE_CUDASIM": "1"}, stdin=payload, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", IDS)
def test_cuda_simulator_matches_reference(sim_results, case_id):
    assert sim_results[case_id] == "ok", sim_results[case_id]
