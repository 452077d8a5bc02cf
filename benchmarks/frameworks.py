"""The demo for every framework with MixMask on and off: kNN before/after, linear probe, img/s, train time.

    python -m benchmarks.frameworks [--frameworks moco_v2,simclr,...] [--masking on,off] [--seeds 0,1,2]
                                    [--out bench-out/frameworks] [--readme docs/results.md] [section.field=value ...]
    make bench-frameworks            (SEEDS=0,1,2 for three seeds; writes the table into docs/results.md)

Each cell is ``train.py model.framework=F mask.enabled=... run.seed=S`` on the demo recipe (configs/demo.yaml
+ configs/demo_F.yaml, exactly what ``make train ARGS="model.framework=F"`` runs), then
``train.py linear eval.augment=false`` on its checkpoint (cached centre-crop features, 100 epochs).
Finished runs (summary.json + linear.json present) are not redone, so an interrupted command resumes.
Prints a table (mean +- std over the seeds where there are several) and writes OUT/frameworks.json
(machine, every run's figures) and OUT/frameworks.md (the table of docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import machine, mean_std, write_section

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- frameworks:start -->", "<!-- frameworks:end -->")
FIGURES = ("knn_top1_init", "knn_top1", "linear_top1", "images_per_sec", "train_seconds")


def run_logged(log: Path, *args: str) -> None:
    """Run a repository script with its output in ``log``; on failure, raise with the log's tail."""
    with log.open("w") as f:
        code = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(args[:2])} failed ({code}), see {log}:\n{tail}")


def run_cell(out: Path, framework: str, masking: bool, seed: int, extra: list[str]) -> dict:
    """Train + linear-probe one (framework, masking, seed) unless already done; return its figures."""
    name = f"{framework}_{'mixmask' if masking else 'plain'}_s{seed}"
    run_dir = out / "runs" / name
    common = [f"model.framework={framework}", f"run.out_dir={out / 'runs'}", f"run.name={name}", "run.progress=false", *extra]
    summary = run_dir / "summary.json"
    if not summary.is_file():
        print(f"training {name} ...", flush=True)
        run_logged(out / "runs" / f"{name}.log", "train.py", *common, f"mask.enabled={str(masking).lower()}",
                   f"run.seed={seed}")
    s = json.loads(summary.read_text())
    ckpt = run_dir / (run_dir / "latest").read_text().strip()
    if not (ckpt / "linear.json").is_file():
        run_logged(out / "runs" / f"{name}.linear.log", "train.py", "linear", *common, "eval.augment=false")
    linear = json.loads((ckpt / "linear.json").read_text())
    return {"run": name, "framework": framework, "mixmask": masking, "seed": seed, "epochs": s["epochs"],
            "knn_top1_init": s["knn_top1_init"], "knn_top1": s["knn_top1"], "linear_top1": linear["top1"],
            "images_per_sec": s["images_per_sec"], "train_seconds": s["train_seconds"],
            "wall_seconds": s["wall_seconds"]}


def markdown(table: list[dict], facts: dict) -> str:
    def fmt(r, f, digits=1):
        return f"{r[f]:.{digits}f}" + (f" ± {r[f + '_std']:.{digits}f}" if len(r["seeds"]) > 1 else "")

    lines = [f"`python -m benchmarks.frameworks` on {facts['date'][:10]}, {facts['cores']} cores {facts['cpu']}, "
             f"{'GPU ' + facts['gpu'] if facts['gpu'] else 'no GPU'}, torch {facts['torch']}; seeds "
             f"{sorted({s for r in table for s in r['seeds']})} (mean ± std where several).", "",
             "| framework | MixMask | kNN before | kNN after | gain | linear probe | train img/s | training s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['framework']} | {'on' if r['mixmask'] else 'off'} | {fmt(r, 'knn_top1_init')} | "
                     f"{fmt(r, 'knn_top1')} | {r['knn_top1'] - r['knn_top1_init']:+.1f} | {fmt(r, 'linear_top1')} | "
                     f"{fmt(r, 'images_per_sec', 0)} | {fmt(r, 'train_seconds', 0)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frameworks", default="moco_v2,simclr,byol,simsiam,barlow_twins")
    ap.add_argument("--masking", default="on,off", help="on, off or both")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="bench-out/frameworks")
    ap.add_argument("--readme", default="",
                    help="put the table between the frameworks markers of this file (docs/results.md)")
    ap.add_argument("overrides", nargs="*", help="section.field=value passed to every run")
    a = ap.parse_args(argv)
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = [run_cell(out, f, m == "on", int(s), a.overrides) for f in a.frameworks.split(",")
            for m in a.masking.split(",") for s in a.seeds.split(",")]
    table, facts = mean_std(rows, ("framework", "mixmask"), FIGURES), machine()
    md = markdown(table, facts)
    print(md)
    (out / "frameworks.md").write_text(md)
    if a.readme:
        write_section(a.readme, MARKERS, md)
    (out / "frameworks.json").write_text(json.dumps({"machine": facts, "args": vars(a), "runs": rows,
                                                     "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
