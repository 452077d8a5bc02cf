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


def test_report_renders_every_row_and_updates_only_its_section(tmp_path):
    from benchmarks.report import END, START, render, update_readme

    bench = {
        "machine": {"date": "2026-11-22T18:00:00", "cores": 2, "cpu": "CPU", "gpu": None, "torch": "t",
                    "dali": "2.4.0", "ffcv": None},
        "args": {"images": 8, "size": 64, "batch": 4, "repeats": 1, "arch": "resnet10", "train_size": 32,
                 "train_batch": 4, "precision": "no", "device": "cpu"},
        "loaders": [{"backend": b, "mixmask": m, "images_per_sec": 10.0 + k, "per_core": 5.0, "vs_baseline": 1.5}
                    for k, (b, m) in enumerate([("torchvision", False), ("torchvision", True), ("dali", False),
                                                ("dali", True)])],
        "kernels": [{"backend": "cpu", "dtype": "float16", "fused_ms": 8.5, "fused_over_copy": 0.7,
                     "speedup_vs_torch": 85.0, "n": 256, "size": 224}],
        "training": [{"feed": "synthetic", "mixmask": True, "images_per_sec": 60.0, "share_of_ceiling": 1.0},
                     {"feed": "synthetic", "mixmask": False, "images_per_sec": 108.0, "share_of_ceiling": 1.8},
                     {"feed": "dali", "mixmask": True, "images_per_sec": 54.0, "share_of_ceiling": 0.9}],
    }
    text = render(bench, "docs/bench.png")
    assert "| torchvision | 10.0 | 11.0 |" in text and "| dali | 12.0 | 13.0 |" in text
    assert "54.0 (0.90)" in text and "60.0 (1.00); plain MoCo v2 108.0 (1.80)" in text
    assert "float16 8.5 ms (0.70 of a copy, 85x the torch ops)" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{START}\nold\n{END}\nafter\n")
    update_readme(readme, text)
    s = readme.read_text()
    assert s.startswith("before\n") and s.endswith(f"{END}\nafter\n") and "old" not in s and text in s
