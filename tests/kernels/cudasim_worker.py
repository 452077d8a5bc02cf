"""Run the CUDA kernels (kernels/mix_cuda.py) in numba's CUDA simulator and compare with the numpy
reference. Invoked by test_kernels_cudasim.py with NUMBA_ENABLE_CUDASIM=1 in a fresh process
(the switch must be set before numba.cuda is imported). Reads a JSON list of cases on stdin,
prints a JSON object {case_id: "ok" | error text} as the last line of stdout.
"""
import json
import os
import sys
import traceback

import numpy as np

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"

from numba import cuda  # noqa: E402

from kernels import fused_mix_reference, sample_masks  # noqa: E402
from kernels import mix_cuda  # noqa: E402
from kernels.mix_cuda import fused_mix_cuda, uniform4_device  # noqa: E402
from kernels.rng import uniform4_reference  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def mix_case(N, H, W, g, perm_kind, masks_kind, dtype, layout, path="auto"):
    """path: "auto" lets fused_mix_cuda choose; "vector" also asserts the vectorised kernels ran
    (W % 4 == 0, aligned contiguous buffers); "scalar" forces the per-element kernels."""
    rng = np.random.default_rng(N * 1000 + H * 10 + W)
    v1 = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    v2 = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    perm = {"random": rng.permutation(N), "identity": np.arange(N), "roll": np.roll(np.arange(N), 1)}[perm_kind]
    perm = perm.astype(np.int64)
    M = {"none": 0, "per_batch": 1, "per_sample": N}[masks_kind]
    masks = sample_masks("discrete", M, g, 0.5, 1, 0, 0) if M else None
    shape = (N, H, W, 3) if layout == "channels_last" else (N, 3, H, W)
    dt = np.int16 if dtype == "bfloat16" else DTYPES[dtype]  # int16 like torch's bf16 .view(int16)
    refs = [np.full(shape, 7, dt) for _ in range(3)]
    fused_mix_reference(v1, v2, masks, perm, MEAN, STD, *refs, layout=layout)
    outs = [cuda.to_device(np.full(shape, 7, dt)) for _ in range(3)]
    stream = cuda.stream()
    calls = []
    real = mix_cuda._launch_vec
    mix_cuda._launch_vec = lambda *a: (calls.append(1), real(*a))
    try:
        fused_mix_cuda(cuda.to_device(v1), cuda.to_device(v2), cuda.to_device(masks) if M else None,
                       cuda.to_device(perm), MEAN, STD, *outs, layout=layout, stream=stream,
                       vectorize=path != "scalar")
    finally:
        mix_cuda._launch_vec = real
    stream.synchronize()
    if (path == "vector") != bool(calls) and path != "auto":
        return f"path {path!r} requested but the vectorised kernels {'ran' if calls else 'did not run'}"
    for name, o, r in zip(("out1", "out2", "outm"), outs, refs):
        got = o.copy_to_host()
        if not np.array_equal(got.view(np.uint8), r.view(np.uint8)):
            return f"{name} differs from the reference"
    if not M and not (outs[2].copy_to_host() == 7).all():
        return "outm written with masking off"
    return "ok"


@cuda.jit
def _rng_kernel(out, seed, epoch, batch_index):
    i = cuda.grid(1)
    if i < out.shape[0]:
        u = uniform4_device(seed, epoch, batch_index, i, i * 3)
        for q in range(4):
            out[i, q] = u[q]


def rng_case(seed, epoch, batch_index):
    out = cuda.device_array((5, 4), np.float64)
    _rng_kernel[1, 32](out, np.uint64(seed), epoch, batch_index)
    want = np.array([uniform4_reference(seed, epoch, batch_index, i, i * 3) for i in range(5)])
    return "ok" if np.array_equal(out.copy_to_host(), want) else "uniform4_device differs from the reference"


def host_array_refused():
    v = np.zeros((1, 2, 2, 3), np.uint8)
    o = cuda.device_array((1, 2, 2, 3), np.float32)
    try:
        fused_mix_cuda(v, v, None, None, MEAN, STD, o, o)
    except TypeError:
        return "ok"
    return "host numpy input accepted"


def main():
    cases = json.load(sys.stdin)
    results = {}
    for case in cases:
        cid, kind, args = case["id"], case["kind"], case["args"]
        try:
            fn = {"mix": mix_case, "rng": rng_case, "host": host_array_refused}[kind]
            results[cid] = fn(*args)
        except Exception:
            results[cid] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
