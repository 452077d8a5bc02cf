"""The seed papers' comparison in miniature: MoCo v2 alone and with each masking method, on the demo.

    python -m benchmarks.methods [--methods plain,mixmask,...] [--seeds 0,1,2] [--epochs 8]
                                 [--out bench-out/methods] [--readme README.md] [section.field=value ...]
    make compare                   (seeds 0,1,2; writes the table and the plot into README.md / docs/)

Each cell is ``train.py mask.method=M run.seed=S optim.epochs=E`` on the demo recipe (configs/demo.yaml +
configs/demo_mask_M.yaml, what ``make train ARGS="mask.method=M"`` runs, at E epochs instead of 16: the
same budget in epochs for every method), then ``train.py linear eval.augment=false`` on its checkpoint.
"plain" is MoCo v2 without masking (mask.enabled=false). Finished runs are not redone, so an interrupted
command resumes. Prints a table (mean +- std over the seeds) and writes OUT/methods.json (machine, every
run), OUT/methods.md and OUT/methods.png (kNN and linear top-1 per method, error bars = std over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks import machine, mean_std
from benchmarks.frameworks import run_logged

MARKERS = ("<!-- methods:start -->", "<!-- methods:end -->")
METHODS = ("plain", "mixmask", "unmix", "unmix_mixmask", "mscn", "saliency", "saliency_mixmask")
LABELS = {"plain": "MoCo v2", "mixmask": "+ MixMask", "unmix": "+ Un-Mix", "unmix_mixmask": "+ Un-Mix + MixMask",
          "mscn": "+ MSCN erase", "saliency": "+ saliency erase, hard negatives",
          "saliency_mixmask": "+ saliency-guided MixMask (ours)"}
FIGURES = ("knn_top1", "linear_top1", "images_per_sec", "train_seconds")


def run_cell(out: Path, method: str, seed: int, epochs: int, extra: list[str]) -> dict:
    """Train + linear-probe one (method, seed) unless already done; return its figures."""
    name = f"{method}_e{epochs}_s{seed}"
    run_dir = out / "runs" / name
    common = [f"run.out_dir={out / 'runs'}", f"run.name={name}", "run.progress=false", *extra]
    masking = ["mask.enabled=false"] if method == "plain" else [f"mask.method={method}"]
    summary = run_dir / "summary.json"
    if not summary.is_file():
        print(f"training {name} ...", flush=True)
        run_logged(out / "runs" / f"{name}.log", "train.py", *common, *masking, f"run.seed={seed}",
                   f"optim.epochs={epochs}", "run.knn_every=0")
    s = json.loads(summary.read_text())
    ckpt = run_dir / (run_dir / "latest").read_text().strip()
    if not (ckpt / "linear.json").is_file():
        run_logged(out / "runs" / f"{name}.linear.log", "train.py", "linear", *common, *masking, "eval.augment=false")
    linear = json.loads((ckpt / "linear.json").read_text())
    return {"run": name, "method": method, "seed": seed, "epochs": s["epochs"], "knn_top1_init": s["knn_top1_init"],
            "knn_top1": s["knn_top1"], "linear_top1": linear["top1"], "images_per_sec": s["images_per_sec"],
            "train_seconds": s["train_seconds"]}


def markdown(table: list[dict], facts: dict, epochs: int, plot: str) -> str:
    def fmt(r, f, digits=1):
        return f"{r[f]:.{digits}f}" + (f" ± {r[f + '_std']:.{digits}f}" if len(r["seeds"]) > 1 else "")

    seeds = sorted({s for r in table for s in r["seeds"]})
    lines = [f"`python -m benchmarks.methods --epochs {epochs}` on {facts['date'][:10]}, {facts['cores']} cores "
             f"{facts['cpu']}, {'GPU ' + facts['gpu'] if facts['gpu'] else 'no GPU'}, torch {facts['torch']}; MoCo v2, "
             f"ResNet-10, demo data, {epochs} epochs each, seeds {seeds} (mean ± std).", "",
             "| method | kNN top-1 | linear top-1 | train img/s | training s |", "|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {LABELS.get(r['method'], r['method'])} (`{r['method']}`) | {fmt(r, 'knn_top1')} | "
                     f"{fmt(r, 'linear_top1')} | {fmt(r, 'images_per_sec', 0)} | {fmt(r, 'train_seconds', 0)} |")
    if plot:
        lines += ["", f"![methods]({plot})"]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = range(len(table))
    for i, (f, label) in enumerate((("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"))):
        ax.bar([k + (i - 0.5) * 0.38 for k in x], [r[f] for r in table], 0.38, yerr=[r[f + "_std"] for r in table],
               capsize=3, label=label)
    ax.set_xticks(list(x), [r["method"] for r in table], rotation=20, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"MoCo v2 on the demo, {epochs} epochs, mean ± std over seeds")
    ax.legend()
    lo = min(min(r["knn_top1"], r["linear_top1"]) for r in table)
    ax.set_ylim(max(0.0, lo - 10), None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs of every run (the demo's 16 halved)")
    ap.add_argument("--out", default="bench-out/methods")
    ap.add_argument("--readme", default="", help="put the table between README's methods markers, the plot in docs/")
    ap.add_argument("overrides", nargs="*", help="section.field=value passed to every run")
    a = ap.parse_args(argv)
    methods = a.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = [run_cell(out, m, int(s), a.epochs, a.overrides) for s in a.seeds.split(",") for m in methods]
    table, facts = mean_std(rows, ("method",), FIGURES), machine()
    plot(table, out / "methods.png", a.epochs)
    md = markdown(table, facts, a.epochs, "docs/methods.png" if a.readme else "")
    print(md)
    (out / "methods.md").write_text(md)
    if a.readme:
        shutil.copy(out / "methods.png", Path(a.readme).parent / "docs" / "methods.png")
        readme = Path(a.readme).read_text()
        start, end = readme.index(MARKERS[0]) + len(MARKERS[0]), readme.index(MARKERS[1])
        Path(a.readme).write_text(readme[:start] + "\n" + md + readme[end:])
    (out / "methods.json").write_text(json.dumps({"machine": facts, "args": vars(a), "runs": rows, "table": table},
                                                 indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
