"""`python -m benchmarks --quick` (the CI smoke variant of `make bench`): every figure is produced,
positive and finite, for every installed backend, and the chart is written."""
import json
import math
import subprocess
import sys

from trainrun import REPO


def test_bench_quick_produces_every_figure(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "bench.json").read_text())
    from benchmarks.__main__ import installed_backends

    backends = installed_backends()
    rows = {(r["backend"], r["mixmask"]) for r in out["loaders"]}
    assert rows == {(b, m) for b in backends for m in (False, True)}
    figures = [r["images_per_sec"] for r in out["loaders"]] + [r["per_core"] for r in out["loaders"]]
    figures += [r["fused_gbps"] for r in out["kernels"]] + [r["copy_gbps"] for r in out["kernels"]]
    figures += [r["images_per_sec"] for r in out["training"]] + [r["share_of_ceiling"] for r in out["training"]]
    assert all(math.isfinite(f) and f > 0 for f in figures), figures
    feeds = [(r["feed"], r["mixmask"]) for r in out["training"]]
    assert feeds[:2] == [("synthetic", True), ("synthetic", False)] and ("torchvision", True) in feeds
    assert out["machine"]["cores"] >= 1 and out["machine"]["torch"]
    assert (tmp_path / "bench.png").stat().st_size > 10_000
