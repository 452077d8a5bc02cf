"""Benchmarks: `python -m benchmarks --quick` (the CI smoke variant of `make bench`) produces every figure,
positive and finite, with its min <= median <= max, for every installed backend; the report, the run
comparison, the pooling of kernel bursts and the ImageNet-like set follow their definitions; the GPU session
script runs dry on the CPU."""
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from trainrun import REPO


def test_bench_quick_in_the_gpu_session_dry_run_produces_every_figure(tmp_path):
    """benchmarks/gpu_session.sh with DRY=1 (the CI dry run of the GPU session: every step on the CPU at tiny
    sizes, the gpu-marked tests collected and skipped) runs `python -m benchmarks --quick` with every step option
    (compile included): every figure, for every installed backend; a second bench step compares the two runs;
    a failing step fails the script."""
    from benchmarks.__main__ import installed_backends
    from benchmarks.report import figures as figure_names, render

    out_dir, cache = tmp_path / "out", tmp_path / "data"
    env = {**os.environ, "DRY": "1", "OUT": str(out_dir), "PY": sys.executable, "CACHE": str(cache)}
    script = ["bash", "benchmarks/gpu_session.sh"]
    res = subprocess.run(script + ["env", "nope"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "failed: nope(2)" in res.stdout, res.stdout[-2000:]
    res = subprocess.run(script + ["env", "tests", "dali", "bench"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=2400)
    assert res.returncode == 0 and "failed" not in res.stdout.splitlines()[-1], (res.stdout[-3000:], res.stderr[-3000:])
    assert "skipped" in (out_dir / "pytest_gpu.txt").read_text()      # collected, and skipped on the CPU
    backends = installed_backends()
    loaders = json.loads((out_dir / "loaders_gpu.json").read_text())
    assert {r["backend"] for r in loaders["results"]} == set(backends)
    assert (cache / "imagenet-like-64" / "train").is_dir()                  # the set went to --cache
    out = json.loads((out_dir / "bench" / "bench.json").read_text())
    rows = {(r["backend"], r["mixmask"]) for r in out["loaders"]}
    assert rows == {(b, m) for b in backends for m in (False, True)}
    figures = [r["images_per_sec"] for r in out["loaders"]] + [r["per_core"] for r in out["loaders"]]
    figures += [r["fused_gbps"] for r in out["kernels"]] + [r["copy_gbps"] for r in out["kernels"]]
    figures += [r["images_per_sec"] for r in out["training"]] + [r["share_of_ceiling"] for r in out["training"]]
    assert all(math.isfinite(f) and f > 0 for f in figures), figures
    for r in out["loaders"] + out["training"]:
        assert 0 < r["min"] <= r["images_per_sec"] <= r["max"] and len(r["runs"]) == 2, r
    for r in out["kernels"]:
        assert r["bursts"] == 3 and len(r["fused_ms_all"]) == 9 and r["matches_reference"], r
        assert 0 < r["fused_ms_min"] <= r["fused_ms"] <= r["fused_ms_max"]
    check_training_rows(out["training"], ["mixmask", "plain", "mixmask+batch_views", "mixmask+compile"], backends)
    assert out["machine"]["cores"] >= 1 and out["machine"]["torch"]
    best = max((r for r in out["training"] if r["feed"] != "synthetic"), key=lambda r: r["share_of_ceiling"])
    assert (out["best_loader"]["feed"], out["best_loader"]["variant"]) == (best["feed"], best["variant"])
    assert out["best_loader"]["target"] == 0.95
    assert out["dataset"]["files"] == 64 and out["dataset"]["mean_kb"] > 30
    assert (out_dir / "bench" / "bench.png").stat().st_size > 10_000
    assert "| synthetic | mixmask+compile |" in render(out)
    # a second run with the same options is compared with the first, figure by figure
    res = subprocess.run(script + ["bench"], cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert json.loads((out_dir / "bench" / "bench-prev.json").read_text()) == out
    again = json.loads((out_dir / "bench" / "bench.json").read_text())
    n = len(set(figure_names(out)) & set(figure_names(again)))  # the loaders fed by the fastest variant may differ
    assert n >= len(out["loaders"]) + len(out["kernels"]) + 4
    assert f" of {n} figures within the other run's noise" in res.stdout, res.stdout[-3000:]


def check_training_rows(rows: list[dict], variants: list[str], backends: list[str]) -> None:
    """Every variant on the synthetic feed, then each training backend with "mixmask" and the fastest MixMask
    variant; shares recomputed from the medians; the host's ms within the step's ms where measured."""
    syn = {r["variant"]: r for r in rows if r["feed"] == "synthetic"}
    assert [r["variant"] for r in rows if r["feed"] == "synthetic"] == variants
    fastest = max((v for v in variants if not v.startswith("plain")), key=lambda v: syn[v]["images_per_sec"])
    fed = [(r["feed"], r["variant"]) for r in rows if r["feed"] != "synthetic"]
    want = [b for b in backends if b in ("torchvision", "dali", "ffcv-jpg")]
    assert fed == [(b, v) for b in want for v in dict.fromkeys(["mixmask", fastest])], fed
    for r in rows:
        assert r["share_of_ceiling"] == pytest.approx(r["images_per_sec"] / syn[r["variant"]]["images_per_sec"])
        assert r["mixmask"] == (not r["variant"].startswith("plain")) and r["first_step_s"] > 0
        assert r["step_ms"] > 0 and (r["host_ms"] is None) == ("compile" in r["variant"]), r
        if r["host_ms"] is not None:
            assert 0 <= r["host_ms"] <= r["step_ms"], r


def _bench(loader_spreads, kernel_ms=(8.5, 8.0, 9.0)):
    return {
        "machine": {"date": "2026-11-22T18:00:00", "cores": 2, "cpu": "CPU", "gpu": None, "torch": "t",
                    "dali": "2.4.0", "ffcv": None},
        "args": {"images": 8, "size": 64, "batch": 4, "repeats": 3, "arch": "resnet10", "train_size": 32,
                 "train_batch": 4, "precision": "no", "device": "cpu", "steps": 2, "train_repeats": 3},
        "dataset": {"files": 8, "mean_kb": 110.0, "mean_wh": [470.0, 390.0]},
        "loaders": [{"backend": b, "mixmask": m, "images_per_sec": med, "min": lo, "max": hi, "per_core": med / 2,
                     "vs_baseline": 1.5} for (b, m), (lo, med, hi) in zip(
                         [("torchvision", False), ("torchvision", True), ("dali", False), ("dali", True)],
                         loader_spreads)],
        "kernels": [{"backend": "cpu", "threads": 2, "dtype": "float16", "fused_ms": kernel_ms[0],
                     "fused_ms_min": kernel_ms[1], "fused_ms_max": kernel_ms[2], "fused_over_copy": 0.7,
                     "speedup_vs_torch": 85.0, "n": 256, "size": 224}],
        "training": [{"feed": "synthetic", "mixmask": True, "images_per_sec": 60.0, "min": 58.0, "max": 61.0,
                      "share_of_ceiling": 1.0},
                     {"feed": "synthetic", "mixmask": False, "images_per_sec": 108.0, "min": 100.0, "max": 110.0,
                      "share_of_ceiling": 1.8},
                     {"feed": "dali", "mixmask": True, "images_per_sec": 54.0, "min": 50.0, "max": 55.0,
                      "share_of_ceiling": 0.9}],
        "best_loader": {"feed": "dali", "share_of_ceiling": 0.9, "target": 0.95},
    }


def test_report_renders_every_row_with_its_noise_and_updates_only_its_section(tmp_path):
    from benchmarks.report import END, GPU_END, GPU_START, START, render, update_readme

    text = render(_bench([(9, 10, 11), (10, 11, 12), (11, 12, 13), (12, 13, 14)]), "docs/bench.png")
    assert "| torchvision | 10 (9-11) | 11 (10-12) |" in text and "| dali | 12 (11-13) | 13 (12-14) |" in text
    assert "| dali | 12 (11-13) | 13 (12-14) | 6.5 | 1.50 | 54.0 (50.0-55.0) | 0.90 |" in text
    assert "| synthetic batch (model-only ceiling) | | | | | 60.0 (58.0-61.0) | 1.00 |" in text
    assert "| synthetic batch, MixMask off (plain MoCo v2) | | | | | 108.0 (100.0-110.0) | 1.80 |" in text
    assert "float16 8.50 ms (8.00-9.00), 0.70 of a copy, 85x the torch ops" in text
    assert "8 generated ImageNet-like JPEGs (mean 470 x 390 px, 110 KB)" in text
    assert "Best loader in the training step: dali (mixmask), at 0.90 of the model-only ceiling (target on a GPU: >= 0.95)" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{START}\nold\n{END}\nmiddle\n{GPU_START}\nold gpu\n{GPU_END}\nafter\n")
    update_readme(readme, text)
    s = readme.read_text()
    assert s.startswith("before\n") and f"{END}\nmiddle\n{GPU_START}\nold gpu\n" in s and "old\n" not in s
    assert text in s
    update_readme(readme, "gpu figures", gpu=True)                    # a GPU run: only the GPU section changes
    assert readme.read_text() == s.replace("old gpu", "gpu figures")


def test_report_training_table_gives_every_variant_and_the_epoch_rows():
    from benchmarks.report import render

    b = _bench([(9, 10, 11), (10, 11, 12), (11, 12, 13), (12, 13, 14)])
    b["training"] += [{"feed": "synthetic", "variant": "mixmask+compile", "mixmask": True, "images_per_sec": 80.0,
                       "min": 79.0, "max": 81.5, "share_of_ceiling": 1.0, "host_ms": None, "step_ms": 50.0,
                       "first_step_s": 41.0},
                      {"feed": "dali", "variant": "mixmask+compile", "mixmask": True, "images_per_sec": 72.0,
                       "min": 70.0, "max": 73.0, "share_of_ceiling": 0.9, "host_ms": 3.25, "step_ms": 55.0,
                       "first_step_s": 41.0}]
    b["epochs"] = [{"size": 24, "epoch_s": 10.0, "min": 9.5, "max": 11.0, "images": 4992, "images_per_sec": 499.2,
                    "vs_full": 0.5}, {"size": 32, "epoch_s": 20.0, "min": 19.0, "max": 21.0, "images": 4992,
                                      "images_per_sec": 249.6, "vs_full": 1.0}]
    text = render(b)
    assert "| synthetic | mixmask | 60.0 (58.0-61.0) | 1.00 | - / - | - |" in text       # a run from before variants
    assert "| synthetic | plain | 108.0 (100.0-110.0) | 1.80 | - / - | - |" in text
    assert "| synthetic | mixmask+compile | 80.0 (79.0-81.5) | 1.00 | - / 50.0 | 41.0 |" in text
    assert "| dali | mixmask+compile | 72.0 (70.0-73.0) | 0.90 | 3.2 / 55.0 | 41.0 |" in text
    assert "| 24 | 10.0 (9.5-11.0) | 499 | 0.50 |" in text and "One demo epoch (4992 images" in text
    # the loader table keeps the plain "mixmask" variant's step, not the compiled one
    assert "| dali | 12 (11-13) | 13 (12-14) | 6.5 | 1.50 | 54.0 (50.0-55.0) | 0.90 |" in text


def test_report_takes_the_epoch_rows_of_a_separate_run_and_names_it(tmp_path):
    from benchmarks.report import END, START, main

    bench, training = tmp_path / "bench.json", tmp_path / "epochs.json"
    bench.write_text(json.dumps(_bench([(9, 10, 11), (10, 11, 12), (11, 12, 13), (12, 13, 14)])))
    training.write_text(json.dumps({"machine": {"date": "2026-12-02T05:40:12"}, "results": [],
                                    "args": {"epoch_sizes": "16,32", "epoch_repeats": 3},
                                    "epochs": [{"size": 16, "epoch_s": 7.0, "min": 6.5, "max": 7.5, "images": 4992,
                                                "images_per_sec": 713.1, "vs_full": 0.7}]}))
    readme = tmp_path / "performance.md"
    readme.write_text(f"{START}\nold\n{END}\n")
    assert main([str(bench), "--readme", str(readme), "--epochs", str(training)]) == 0
    s = readme.read_text()
    assert "| 16 | 7.0 (6.5-7.5) | 713 | 0.70 |" in s
    assert ("(rerun alone, 2026-12-02 05:40: `python -m benchmarks.training --json PATH --variants '' --backends '' "
            "--epoch-sizes 16,32 --epoch-repeats 3`)") in s
    training.write_text(json.dumps({"machine": {"date": "2026-12-02T05:40:12"}, "results": []}))
    with pytest.raises(SystemExit, match="no epoch rows"):
        main([str(bench), "--epochs", str(training)])


def test_compare_overlap_is_interval_intersection():
    from benchmarks.report import compare

    a = _bench([(9, 10, 11), (10, 11, 12), (11, 12, 13), (12, 13, 14)])
    b = _bench([(11, 12, 13), (12.5, 13, 14), (5, 6, 10.999), (12, 13, 14)], kernel_ms=(9.5, 9.1, 9.9))
    rows = {r["figure"]: r for r in compare(a, b)}
    assert rows["loader torchvision mixmask off"]["overlap"]         # touching at 11: [9, 11] vs [11, 13]
    assert not rows["loader torchvision mixmask on"]["overlap"]      # [10, 12] vs [12.5, 14]
    assert not rows["loader dali mixmask off"]["overlap"]            # [11, 13] vs [5, 10.999]
    assert rows["loader dali mixmask on"]["overlap"] and rows["loader dali mixmask on"]["ratio"] == 1.0
    assert not rows["kernel cpu 2 float16"]["overlap"]               # [8, 9] ms vs [9.1, 9.9] ms
    assert rows["kernel cpu 2 float16"]["ratio"] == pytest.approx(9.5 / 8.5)
    assert len(rows) == 4 + 3 + 1


def test_kernel_bursts_pool_their_rounds():
    from benchmarks.kernels import merge_bursts

    def row(ms, copy, ref=None):
        return {"backend": "cpu", "dtype": "float16", "threads": 2, "bytes_moved": 1_000_000, "fused_ms_all": ms,
                "fused_ms": statistics.median(ms), "copy_gbps": copy, "torch_ref_ms": ref,
                "copy_gbps_by_method": {"numpy": copy}, "matches_reference": True}

    bursts = [[row([1.0, 1.2, 1.1], 50.0)], [row([2.0, 2.2, 2.1], 40.0, ref=100.0)], [row([1.5, 1.4, 1.6], 60.0)]]
    (m,) = merge_bursts(bursts)
    pooled = [1.0, 1.2, 1.1, 2.0, 2.2, 2.1, 1.5, 1.4, 1.6]
    assert m["fused_ms"] == statistics.median(pooled) == 1.5
    assert (m["fused_ms_min"], m["fused_ms_max"], m["bursts"]) == (1.0, 2.2, 3)
    assert m["fused_gbps"] == pytest.approx(1_000_000 / 1.5e-3 / 1e9)   # bytes / s at the pooled median
    assert m["copy_gbps"] == 50.0 and m["fused_over_copy"] == pytest.approx(m["fused_gbps"] / 50.0)
    assert m["torch_ref_ms"] == 100.0 and m["speedup_vs_torch"] == pytest.approx(100.0 / 1.5)


def test_imagenet_like_sizes_follow_the_stated_distribution():
    from benchmarks.imagenet_like import image_size

    rng = np.random.default_rng(1)
    wh = np.array([image_size(rng) for _ in range(20000)])
    long, short = wh.max(1), wh.min(1)
    assert abs((long == 500).mean() - 0.8) < 0.02                          # the 500 px mode
    assert abs((wh[:, 0] > wh[:, 1]).mean() - 0.75) < 0.02                  # landscape
    aspect = short / long
    assert abs(np.isclose(aspect, 0.75, atol=2e-3).mean() - 0.55) < 0.03    # 3:4 (uniform part: ~0.2% near it)
    assert 200 <= long.min() and long.max() <= 1000 and short.min() >= 100
    mw, mh = wh.mean(0)
    assert 440 < mw < 490 and 380 < mh < 420                               # ImageNet: ~469 x 387


def test_imagenet_like_set_is_deterministic_and_cached(tmp_path):
    from benchmarks import imagenet_like

    a = imagenet_like.ensure(tmp_path / "a", 6, classes=2, workers=1)
    b = imagenet_like.ensure(tmp_path / "b", 6, classes=2, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 6 + 2 and files == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    stamp = (a / "train/c00/000000.jpg").stat().st_mtime_ns
    assert imagenet_like.ensure(tmp_path / "a", 6, classes=2) == a                    # cached: not rewritten
    assert (a / "train/c00/000000.jpg").stat().st_mtime_ns == stamp
    facts = imagenet_like.facts(a)
    assert facts["files"] == 6 and 30 < facts["mean_kb"] < 400


def test_there_and_back_splits_repeats_and_reverses():
    from benchmarks import there_and_back

    assert there_and_back(["a", "b", "c"], 5) == [("a", 3), ("b", 3), ("c", 3), ("c", 2), ("b", 2), ("a", 2)]
    assert there_and_back(["a", "b"], 1) == [("a", 1), ("b", 1)]
    assert there_and_back(["a", "b"], 2) == [("a", 1), ("b", 1), ("b", 1), ("a", 1)]


def test_bad_data_folder_is_one_line_error(tmp_path):
    (tmp_path / "train").mkdir()
    for data, msg in ((tmp_path / "missing", "no train/ folder in it"), (tmp_path, "no class folders in")):
        res = subprocess.run([sys.executable, "-m", "benchmarks.loaders", "--json", str(tmp_path / "x.json"),
                              "--data", str(data), "--backends", "torchvision"], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode != 0 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_every_suite_variant_is_a_valid_demo_config():
    """Each cell of `python -m benchmarks.methods --suite S` is train.py with the variant's overrides on the
    demo recipe train.py itself layers: every one must load (a typo would only surface an hour into a suite),
    and the variants of a suite must differ from each other."""
    sys.path.insert(0, str(REPO))
    from benchmarks.methods import SUITES
    from mixmask.config import load_config
    from train import default_configs

    for name, suite in SUITES.items():
        seen = []
        for variant, (_, overrides) in suite.variants.items():
            cfg = load_config(default_configs(overrides), overrides).to_dict()
            assert cfg not in seen, (name, variant)
            seen.append(cfg)



def test_epoch_rows_time_each_view_size():
    """benchmarks.training.epoch_rows: one (here: truncated) demo epoch per view size through the loader and the
    demo model; each row's share of the largest size's epoch is its own median over that one."""
    from benchmarks.training import epoch_rows

    rows = epoch_rows([16, 24], repeats=1, batch=16, cores=2, device="cpu", precision="no", max_batches=2)
    assert [r["size"] for r in rows] == [16, 24] and all(r["images"] == 32 for r in rows)
    assert all(r["epoch_s"] > 0 and r["min"] <= r["epoch_s"] <= r["max"] for r in rows)
    assert rows[1]["vs_full"] == 1.0 and rows[0]["vs_full"] == pytest.approx(rows[0]["epoch_s"] / rows[1]["epoch_s"])
    assert rows[0]["images_per_sec"] == pytest.approx(32 / rows[0]["epoch_s"])
