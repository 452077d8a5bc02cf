"""Run the CUDA float kernels (kernels/fill_cuda.py) in numba's CUDA simulator and compare with the numpy
references of kernels/fill.py. Invoked by test_kernels_fill_cudasim.py with NUMBA_ENABLE_CUDASIM=1 in a
fresh process (the switch must be set before numba.cuda is imported). Reads a JSON list of cases on
stdin, prints a JSON object {case_id: "ok" | error text} as the last line of stdout.
"""
import json
import os
import sys
import traceback

import numpy as np

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"

from numba import cuda  # noqa: E402

from kernels import fill_cuda  # noqa: E402
from kernels.fill import high_pass_reference, mixup_reference, noise_fill_reference  # noqa: E402


def _views(N, C, H, W, layout, seed):
    """(host reference array, device array) of the same logical (N, C, H, W) values and layout."""
    rng = np.random.default_rng(seed)
    if layout == "channels_last":  # NHWC memory seen as logical NCHW, as torch's channels_last tensors
        nhwc = rng.standard_normal((N, H, W, C)).astype(np.float32)
        host = np.transpose(nhwc, (0, 3, 1, 2))
        dev = cuda.to_device(nhwc).transpose((0, 3, 1, 2))  # the simulator's arrays transpose as views
    else:
        host = rng.standard_normal((N, C, H, W)).astype(np.float32)
        dev = cuda.to_device(host)
    if dev.strides != host.strides:
        raise AssertionError(f"device copy has strides {dev.strides}, host {host.strides}")
    return host.copy(order="K"), dev


def noise_case(N, C, H, W, Cm, g, box, layout, seed, epoch, batch_index, stream):
    """box: null (no focal window) or [top, left, h, w] for sample 0 (the others get none)."""
    rng = np.random.default_rng(seed % 1000 + 7)
    masks = (rng.random((N, Cm, g, g)) < 0.6).astype(np.uint8)
    boxes = np.zeros((N, 4), np.int64)
    if box is not None:
        boxes[0] = box
    host, dev = _views(N, C, H, W, layout, seed % 1000)
    before = host.copy()
    std = 0.75
    noise_fill_reference(host, masks, boxes, std, seed, epoch, batch_index, stream)
    if np.array_equal(host, before):
        return "the reference filled nothing (a vacuous case)"
    s = cuda.stream()
    fill_cuda.noise_fill_(dev, cuda.to_device(masks), cuda.to_device(boxes), std, seed, epoch, batch_index,
                          stream, cuda_stream=s)
    s.synchronize()
    got = dev.copy_to_host()
    if not np.array_equal(got, host):
        bad = np.argwhere(got != host)
        return f"{len(bad)} elements differ from noise_fill_reference, first at {bad[0].tolist()}"
    return "ok"


def high_pass_case(N, C, H, W, ksize, sigma, layout):
    host, dev = _views(N, C, H, W, layout, ksize * 100 + H)
    want = np.zeros((N, C, H, W), np.float32)
    high_pass_reference(host, want, ksize, sigma)
    out = cuda.to_device(np.full((N, C, H, W), 7, np.float32))
    fill_cuda.high_pass(dev, out, ksize, sigma)
    got = out.copy_to_host()
    if not np.allclose(got, want, rtol=0, atol=1e-5):
        return f"high_pass differs from the reference by up to {np.abs(got - want).max():.3g}"
    return "ok"


def mixup_case(N, C, H, W, layout):
    host, dev = _views(N, C, H, W, layout, N + 10 * W)
    rng = np.random.default_rng(5)
    perm = rng.permutation(N).astype(np.int64)
    lam = rng.random(N).astype(np.float32)
    want = np.zeros((N, C, H, W), np.float32)
    mixup_reference(host, perm, lam, want)
    out = cuda.device_array((N, C, H, W), np.float32)
    fill_cuda.mixup(dev, cuda.to_device(perm), cuda.to_device(lam), out)
    if not np.array_equal(out.copy_to_host(), want):
        return "mixup differs from mixup_reference"
    return "ok"


def host_array_refused():
    x = np.zeros((1, 3, 4, 4), np.float32)
    d = cuda.to_device(x)
    calls = {
        "noise_fill_": lambda: fill_cuda.noise_fill_(x, cuda.to_device(np.ones((1, 1, 2, 2), np.uint8)),
                                                     cuda.to_device(np.zeros((1, 4), np.int64)), 1.0, 0, 0, 0, 1),
        "high_pass": lambda: fill_cuda.high_pass(x, cuda.device_array((1, 3, 4, 4), np.float32), 3, 1.0),
        "mixup": lambda: fill_cuda.mixup(d, np.zeros(1, np.int64), cuda.to_device(np.ones(1, np.float32)),
                                         cuda.device_array((1, 3, 4, 4), np.float32)),
    }
    for name, call in calls.items():
        try:
            call()
        except TypeError:
            continue
        return f"{name} accepted a host numpy array"
    return "ok"


def overlap_refused():
    d = cuda.to_device(np.zeros((2, 3, 4, 4), np.float32))
    for name, call in (("high_pass", lambda: fill_cuda.high_pass(d, d, 3, 1.0)),
                       ("mixup", lambda: fill_cuda.mixup(d, cuda.to_device(np.arange(2)),
                                                         cuda.to_device(np.ones(2, np.float32)), d))):
        try:
            call()
        except ValueError:
            continue
        return f"{name} accepted out aliasing x"
    return "ok"


def main():
    cases = json.load(sys.stdin)
    results = {}
    for case in cases:
        cid, kind, args = case["id"], case["kind"], case["args"]
        try:
            fn = {"noise": noise_case, "high_pass": high_pass_case, "mixup": mixup_case,
                  "host": host_array_refused, "overlap": overlap_refused}[kind]
            results[cid] = fn(*args)
        except Exception:
            results[cid] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
