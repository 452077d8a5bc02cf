"""Throughput of the fused MixMask kernel (kernels/mix.py, MixMask: Vishniakov et al., arXiv
2210.11456) against a plain memory copy and a straightforward torch pipeline.

    python -m benchmarks.kernels --json PATH [--n 256 --size 224 --repeats 7 --quick]

Per output dtype, for an ImageNet-shaped batch (N x S x S x 3 uint8, two views, one block mask per
batch at g=8, r=0.5, perm = roll by one, channels_last outputs):
- fused_ms: median over repeats of kernels.fused_mix (after a warm-up call that compiles/loads it).
- bytes_moved = 2 * N*S*S*3 (read the two uint8 views) + 3 * N*S*S*3 * itemsize (write out1,
  out2, outm). (The kernel also reads the partner rows of the replaced cells, ~(1 - lam) of a view;
  not counted.) fused_gbps = bytes_moved / fused time.
- copy_gbps: a copy of bytes_moved / 2 bytes (so read + write = bytes_moved), timed in the same
  rounds as the kernel (interleaved, so machine noise hits both): np.copyto (one thread, glibc
  memcpy, non-temporal stores for big buffers), a numba prange copy (all threads, ordinary stores)
  and the same with streaming stores (the fused kernel's store path); the fastest is copy_gbps.
- Buffers are 64-byte aligned, as torch's CPU allocator makes them.
- torch_ref_ms: the same outputs as separate torch ops (permute, float, normalise, F.interpolate
  nearest of the mask, blend, cast), all threads.
- On a CUDA machine (numba.cuda and torch.cuda available) also the CUDA kernel on torch tensors
  (vectorised and per-element variants), timed with CUDA events behind a spin kernel so that only
  GPU time is counted, against a device-to-device copy of the same bytes and the torch ops on the
  GPU; host_us_per_call is the Python-side cost of one launch (it overlaps GPU work).
The JSON holds every number plus the device (CPU model, cores, versions, date, load average).

Measured 2026-11-22 15:00 (AMD EPYC Zen 5 VM, 2 vCPUs shared with other jobs, load average ~3;
numba 0.68.1, numpy 2.4.6, torch 2.14.1), N=256 224x224, medians of 7, channels_last:
    threads dtype     fused_ms  GB/s   / np.copyto  / numba copy  / streaming copy   vs torch
    2       float16     15.5    19.9      1.03         0.70          0.69            69x
    2       bfloat16    15.5    19.9      1.05         0.60          0.70            69x
    2       float32     18.5    29.1      1.16         0.91          0.86            50x
    1       float16     12.1    25.6      0.67         0.67          0.50             -
    1       float32     16.7    32.4      0.88         0.86          0.66             -
On this loaded machine two threads do not beat one (the second core is mostly busy elsewhere);
per core, the kernel reaches ~0.5-0.9 of a pure copy: it moves 3 input + 3 output streams with
the normalisation in between, and the compute (~28 G elements/s/core in L1 for f16) and the
streaming stores overlap only partly. The torch reference takes ~0.9-1.1 s per batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from kernels.masks import sample_masks
from kernels.mix import fused_mix, fused_mix_reference

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255  # ImageNet, uint8 units
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 as bits


def _device_info() -> dict:
    """benchmarks.machine() with the thread counts the kernel and the torch reference run on."""
    import numba
    import torch

    from benchmarks import machine

    return machine() | {"numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
                        "loadavg_start": os.getloadavg()}


def _numba_copies():
    """Two all-thread numba copies of (R, C) uint8 rows: ordinary stores, and streaming
    (non-temporal) stores through kernels.mix.stream_store, the store path of the fused kernel."""
    from numba import njit, prange

    from kernels.mix import store_fence, stream_store

    @njit(parallel=True, nogil=True)
    def pcopy(src, dst):
        for i in prange(src.shape[0]):
            dst[i, :] = src[i, :]

    @njit(parallel=True, nogil=True)
    def pcopy_stream(src, dst):  # dst (R, 1, C)
        for i in prange(src.shape[0]):
            stream_store(dst, i, 0, 0, src[i])
        store_fence()
    return pcopy, pcopy_stream


def aligned_empty(shape, dtype, align=64):
    """np.empty, but 64-byte aligned like torch's CPU allocator (numpy's big arrays sit 16 bytes
    off a page): the buffers the torch side will pass."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _torch_reference(v1, v2, mask, perm, dtype_name):
    """The unfused pipeline a torch user would write; returns a closure producing (x1, x2, mixed)."""
    import torch
    import torch.nn.functional as F
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    t1, t2 = torch.from_numpy(v1), torch.from_numpy(v2)       # (N, H, W, 3) uint8
    m = torch.from_numpy(mask).float()[:, None]                # (1, 1, g, g)
    p = torch.from_numpy(perm)
    mean = torch.from_numpy(MEAN).view(1, 3, 1, 1)
    std = torch.from_numpy(STD).view(1, 3, 1, 1)
    H, W = v1.shape[1:3]

    def run():
        x1 = (t1.permute(0, 3, 1, 2).float() - mean) / std     # (N, 3, H, W) channels_last memory
        x2 = (t2.permute(0, 3, 1, 2).float() - mean) / std
        up = F.interpolate(m, size=(H, W), mode="nearest")     # (1, 1, H, W)
        mixed = up * x1 + (1 - up) * x1[p]
        return x1.to(tdt), x2.to(tdt), mixed.to(tdt)
    return run


def bench_cpu(n, size, dtype_name, repeats, torch_repeats, threads=None, g=8, ratio=0.5, seed=0) -> dict:
    """One CPU row; threads: numba threads for the kernel and the numba copies (None = all)."""
    import numba
    all_threads = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads or all_threads)
    try:
        row = _bench_cpu(n, size, dtype_name, repeats, torch_repeats, g, ratio, seed)
    finally:
        numba.set_num_threads(all_threads)
    row["threads"] = threads or all_threads
    return row


def _inputs(n, size, g, ratio, seed):
    """Two random uint8 views (N, H, W, 3), one block mask (1, g, g) and perm = roll by one."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3)
    v1 = rng.integers(0, 256, shape, dtype=np.uint8)          # (N, H, W, 3)
    v2 = rng.integers(0, 256, shape, dtype=np.uint8)
    masks = sample_masks("block", 1, g, ratio, seed, 0, 0)    # (1, g, g): one per batch (paper)
    perm = np.roll(np.arange(n, dtype=np.int64), 1)            # derangement for any N > 1
    return v1, v2, masks, perm


def bench_torch_reference(n, size, dtype_name, repeats, g=8, ratio=0.5, seed=0) -> float:
    """Median ms of the unfused torch pipeline on the same inputs as the kernel rows."""
    run = _torch_reference(*_inputs(n, size, g, ratio, seed), dtype_name)
    run()
    return 1e3 * statistics.median(_timed(run) for _ in range(repeats))


def _bench_cpu(n, size, dtype_name, repeats, torch_repeats, g, ratio, seed) -> dict:
    v1, v2, masks, perm = _inputs(n, size, g, ratio, seed)
    shape = v1.shape
    dt = NP_DTYPES[dtype_name]
    outs = [aligned_empty(shape, dt) for _ in range(3)]        # channels_last (N, H, W, 3)
    for o in outs:
        o.fill(0)                                              # fault the pages in before timing
    itemsize = np.dtype(dt).itemsize
    bytes_moved = 2 * v1.size + 3 * v1.size * itemsize

    t0 = time.perf_counter()
    fused_mix(v1, v2, masks, perm, MEAN, STD, *outs)           # warm-up: compile or load the cache
    warmup_s = time.perf_counter() - t0
    k = min(n, 2)                                              # spot check against the reference
    refs = [np.empty((k,) + shape[1:], dt) for _ in range(3)]
    perm_k = np.roll(np.arange(k, dtype=np.int64), 1)
    fused_mix_reference(v1[:k], v2[:k], masks, perm_k, MEAN, STD, *refs)
    ok = all(np.array_equal(o[:k].view(np.uint8), r.view(np.uint8)) for o, r in zip(outs[:2], refs[:2]))

    half = bytes_moved // 2
    cols = 1 << 16 if half >= 1 << 22 else 64  # numba copies: prange over rows of cols bytes
    rows = half // cols
    src = aligned_empty((rows, cols), np.uint8)
    dst = aligned_empty((rows, cols), np.uint8)
    src.fill(1)
    dst.fill(0)
    pcopy, pcopy_stream = _numba_copies()
    copies = {"numpy": lambda: np.copyto(dst, src), "numba": lambda: pcopy(src, dst),
              "numba_stream": lambda: pcopy_stream(src, dst.reshape(rows, 1, cols))}
    for c in copies.values():
        c()
    t_fused = []
    t_copy = {name: [] for name in copies}
    for _ in range(repeats):  # interleaved rounds: the same noise for the kernel and the copies
        t_fused.append(_timed(lambda: fused_mix(v1, v2, masks, perm, MEAN, STD, *outs)))
        for name, c in copies.items():
            t_copy[name].append(_timed(c))
    del src, dst
    fused_s = statistics.median(t_fused)
    copy_s = {name: statistics.median(t) * half / (rows * cols) for name, t in t_copy.items()}

    torch_ms = bench_torch_reference(n, v1.shape[1], dtype_name, torch_repeats, g, ratio, seed) if torch_repeats else None
    copy_gbps = {name: bytes_moved / t / 1e9 for name, t in copy_s.items()}
    best_copy = max(copy_gbps.values())
    fused_gbps = bytes_moved / fused_s / 1e9
    return {
        "backend": "cpu", "dtype": dtype_name, "layout": "channels_last", "n": n, "size": size,
        "g": g, "masks_per_batch": 1, "bytes_moved": bytes_moved,
        "fused_ms": 1e3 * fused_s, "fused_ms_all": [1e3 * t for t in t_fused],
        "fused_ms_min": 1e3 * min(t_fused), "fused_ms_max": 1e3 * max(t_fused),
        "fused_gbps": fused_gbps,
        "copy_gbps": best_copy, "copy_gbps_by_method": copy_gbps,
        "fused_over_copy": fused_gbps / best_copy,
        "torch_ref_ms": torch_ms,
        "speedup_vs_torch": (torch_ms / (1e3 * fused_s)) if torch_ms else None,
        "warmup_s": warmup_s, "matches_reference": bool(ok),
    }


def bench_cuda(n, size, dtype_name, repeats, g=8, ratio=0.5, seed=0, vectorize=True,
               torch_ref=True) -> dict:
    """One CUDA row: the kernel on torch tensors (CUDA events, median of `repeats`), a device-to-
    device copy of bytes_moved / 2 in the same rounds, and the unfused torch ops on the GPU."""
    import torch
    from numba import cuda
    from kernels.mix_cuda import fused_mix_cuda
    dev = torch.device("cuda")
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    v1_h, v2_h, masks_h, perm_h = _inputs(n, size, g, ratio, seed)
    v1, v2 = torch.from_numpy(v1_h).to(dev), torch.from_numpy(v2_h).to(dev)  # (N, H, W, 3) uint8
    masks, perm = torch.from_numpy(masks_h).to(dev), torch.from_numpy(perm_h).to(dev)
    ts = [torch.empty(n, 3, size, size, dtype=tdt, device=dev).to(memory_format=torch.channels_last)
          for _ in range(3)]
    outs = [t.permute(0, 2, 3, 1) for t in ts]            # (N, H, W, 3) C-contiguous views
    if dtype_name == "bfloat16":
        outs = [o.view(torch.int16) for o in outs]
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    itemsize = ts[0].element_size()
    bytes_moved = 2 * v1.numel() + 3 * v1.numel() * itemsize

    def fused():
        fused_mix_cuda(v1, v2, masks, perm, MEAN, STD, *outs, stream=stream, vectorize=vectorize)
    t0 = time.perf_counter()
    fused()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    k = min(n, 4)                                          # check a few samples against numpy
    refs = [np.empty((k, size, size, 3), NP_DTYPES[dtype_name]) for _ in range(3)]
    fused_mix_reference(v1_h[:k], v2_h[:k], masks_h, np.roll(np.arange(k, dtype=np.int64), 1),
                        MEAN, STD, *refs)             # samples 1..k-1 have the same partners (j - 1)
    got = [o[:k].cpu().numpy() for o in outs]
    ok = all(np.array_equal(g_.view(np.uint8), r.view(np.uint8)) for g_, r in zip(got[:2], refs[:2]))
    ok = ok and np.array_equal(got[2][1:].view(np.uint8), refs[2][1:].view(np.uint8))
    src = torch.ones(bytes_moved // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def gpu_time(fn, reps=10):
        """(GPU seconds per call, host seconds per call). The stream is first held by a ~30 ms
        spin kernel, so the host has enqueued all reps before the GPU reaches them and the events
        time the GPU work alone (launches from Python cost more than a small kernel runs)."""
        fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)
        start.record()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        host = (time.perf_counter() - t) / reps
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps, host
    t_f, t_c, t_h = [], [], []
    for _ in range(repeats):
        gt, ht = gpu_time(fused)
        t_f.append(gt)
        t_h.append(ht)
        t_c.append(gpu_time(lambda: dst.copy_(src))[0])
    fs, cs = statistics.median(t_f), statistics.median(t_c)
    torch_ms = None
    if torch_ref:
        mean = torch.from_numpy(MEAN).to(dev).view(1, 3, 1, 1)
        std = torch.from_numpy(STD).to(dev).view(1, 3, 1, 1)
        m = masks.float()[:, None]

        def ref():
            x1 = (v1.permute(0, 3, 1, 2).float() - mean) / std
            x2 = (v2.permute(0, 3, 1, 2).float() - mean) / std
            up = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")
            mixed = up * x1 + (1 - up) * x1[perm]
            return x1.to(tdt), x2.to(tdt), mixed.to(tdt)
        torch_ms = 1e3 * statistics.median(gpu_time(ref, 3)[0] for _ in range(max(3, repeats // 2)))
    return {"backend": "cuda", "variant": "vector" if vectorize else "scalar", "dtype": dtype_name,
            "layout": "channels_last", "n": n, "size": size, "bytes_moved": bytes_moved,
            "fused_ms": 1e3 * fs, "fused_ms_all": [1e3 * t for t in t_f],
            "fused_ms_min": 1e3 * min(t_f), "fused_ms_max": 1e3 * max(t_f),
            "fused_gbps": bytes_moved / fs / 1e9, "copy_gbps": bytes_moved / cs / 1e9,
            "fused_over_copy": cs / fs, "torch_ref_ms": torch_ms,
            "host_us_per_call": 1e6 * statistics.median(t_h),
            "speedup_vs_torch": torch_ms / (1e3 * fs) if torch_ms else None,
            "warmup_s": warmup_s, "matches_reference": bool(ok), "gpu": torch.cuda.get_device_name()}


def _cuda_available() -> bool:
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        from numba import cuda
        return cuda.is_available()
    except Exception:
        return False


def measure(n, size, dtypes, repeats, torch_repeats, single_thread=False, skip_cpu=False) -> list[dict]:
    """Every row: CPU (all threads; one thread too with single_thread) unless skip_cpu, and the CUDA
    kernels (vectorised and per-element) when a GPU is there."""
    # the kernel/copy rows first, the torch references after them all, so nothing but the row itself
    # runs between its kernel and copy rounds. Seen on the 2-vCPU VM: a row run later sometimes gets a
    # faster memory regime for both its copy and its kernel (e.g. copy 91 vs 52 GB/s for the same
    # bytes): compare the kernel with the copy of its own row, and across several runs.
    rows = [] if skip_cpu else [bench_cpu(n, size, d, repeats, 0) for d in dtypes]
    for r in rows:
        if torch_repeats:
            r["torch_ref_ms"] = bench_torch_reference(n, size, r["dtype"], torch_repeats)
            r["speedup_vs_torch"] = r["torch_ref_ms"] / r["fused_ms"]
    if single_thread and not skip_cpu:
        rows += [bench_cpu(n, size, d, repeats, 0, threads=1) for d in dtypes]
    if _cuda_available():
        rows += [bench_cuda(n, size, d, repeats) for d in dtypes]
        rows += [bench_cuda(n, size, d, repeats, vectorize=False, torch_ref=False) for d in dtypes]
    return rows


def merge_bursts(bursts: list[list[dict]]) -> list[dict]:
    """One row per kernel from the same rows timed in several bursts spread over a run (the memory
    bandwidth of a shared VM drifts over minutes, far more than within one burst): fused_ms is the
    median of every round, fused_ms_min/max their extremes; copy_gbps the median of the bursts' copies;
    the torch reference from the burst that timed it."""
    merged = []
    for k, row in enumerate(bursts[0]):
        same = [b[k] for b in bursts]
        key = (row["backend"], row["dtype"], row.get("threads"), row.get("variant"))
        assert all((r["backend"], r["dtype"], r.get("threads"), r.get("variant")) == key for r in same), key
        allms = [t for r in same for t in r["fused_ms_all"]]
        m = dict(row, fused_ms_all=allms, fused_ms=statistics.median(allms), fused_ms_min=min(allms),
                 fused_ms_max=max(allms), bursts=len(same))
        m["fused_gbps"] = m["bytes_moved"] / m["fused_ms"] / 1e6
        m["copy_gbps"] = statistics.median(r["copy_gbps"] for r in same)
        m["fused_over_copy"] = m["fused_gbps"] / m["copy_gbps"]
        if "copy_gbps_by_method" in row:
            m["copy_gbps_by_method"] = {name: statistics.median(r["copy_gbps_by_method"][name] for r in same)
                                        for name in row["copy_gbps_by_method"]}
        ref = next((r["torch_ref_ms"] for r in same if r.get("torch_ref_ms")), None)
        m["torch_ref_ms"] = ref
        m["speedup_vs_torch"] = ref / m["fused_ms"] if ref else None
        m["matches_reference"] = all(r.get("matches_reference", True) for r in same)
        merged.append(m)
    return merged


def print_rows(rows: list[dict], n: int, size: int, device: dict) -> None:
    head = f"{'backend':7} {'thr':>6} {'dtype':9} {'fused_ms':>9} {'min-max':>13} {'fused_GB/s':>10} {'copy_GB/s':>9} " \
           f"{'fused/copy':>10} {'torch_ms':>9} {'speedup':>8} {'ok':>3}"
    print(f"fused MixMask kernel, N={n} {size}x{size}x3 uint8 -> 3 outputs channels_last")
    print(f"device: {device['cpu']}, {device['cores']} cores, numba {device['numba']}, "
          f"numpy {device['numpy']}, torch {device.get('torch')}, {device['date']}, "
          f"load {device['loadavg_start'][0]:.2f}->{device['loadavg_end'][0]:.2f}")
    print("bytes_moved = 2*N*H*W*3 (uint8 reads) + 3*N*H*W*3*itemsize (writes); copy = bytes_moved/2 copied")
    print(head)
    for r in rows:
        tm = f"{r['torch_ref_ms']:9.1f}" if r.get("torch_ref_ms") else f"{'-':>9}"
        sp = f"{r['speedup_vs_torch']:7.1f}x" if r.get("speedup_vs_torch") else f"{'-':>8}"
        ok = "yes" if r.get("matches_reference", True) else "NO"
        thr = r.get("threads", r.get("variant", "-"))
        print(f"{r['backend']:7} {thr:>6} {r['dtype']:9} {r['fused_ms']:9.2f} "
              f"{r['fused_ms_min']:6.2f}-{r['fused_ms_max']:<6.2f} {r['fused_gbps']:10.2f} "
              f"{r['copy_gbps']:9.2f} {r['fused_over_copy']:10.2f} {tm} {sp} {ok:>3}")
    print("fused_GB/s / copy_GB/s per copy method (numpy = np.copyto, numba = prange copy, "
          "numba_stream = prange copy with streaming stores):")
    for r in rows:
        if "copy_gbps_by_method" in r:
            ratios = ", ".join(f"{k} {r['fused_gbps'] / v:.2f}" for k, v in r["copy_gbps_by_method"].items())
            print(f"  {r['backend']} {r.get('threads', '-')}t {r['dtype']:9} {ratios}")
    for r in rows:
        if "host_us_per_call" in r:
            print(f"  cuda {r['variant']} {r['dtype']:9} host-side launch {r['host_us_per_call']:.0f} us/call "
                  f"(Python; overlaps the GPU work of earlier batches)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--n", type=int, default=256, help="batch size")
    ap.add_argument("--size", type=int, default=224, help="image side (pixels)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--torch-repeats", type=int, default=3, help="timed torch reference runs (0 = skip)")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--single-thread", action="store_true",
                    help="also time the kernel and the copies on one thread (per-core efficiency; far "
                         "less sensitive than the all-thread rows to other jobs on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run for CI")
    ap.add_argument("--skip-cpu", action="store_true", help="CUDA rows only (on a GPU machine)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.size, args.repeats, args.torch_repeats = 4, 32, 2, 1
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in NP_DTYPES for d in dtypes):
        ap.error(f"--dtypes must be among {sorted(NP_DTYPES)}")

    if args.skip_cpu and not _cuda_available():
        ap.error("--skip-cpu needs a CUDA GPU (torch.cuda and numba.cuda)")
    device = _device_info()
    rows = measure(args.n, args.size, dtypes, args.repeats, args.torch_repeats, args.single_thread, args.skip_cpu)
    device["loadavg_end"] = os.getloadavg()
    print_rows(rows, args.n, args.size, device)
    head_row = rows[0]
    out = {"fused_gbps": head_row["fused_gbps"], "copy_gbps": head_row["copy_gbps"],
           "torch_ref_ms": head_row["torch_ref_ms"], "fused_ms": head_row["fused_ms"],
           "headline_dtype": head_row["dtype"], "device": device, "args": vars(args),
           "bytes_formula": "2*N*H*W*3 + 3*N*H*W*3*itemsize", "results": rows}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    return 0 if all(r.get("matches_reference", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
