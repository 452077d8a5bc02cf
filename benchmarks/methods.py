"""The seed papers' comparisons in miniature, one command per suite, on the demo:

    python -m benchmarks.methods [--suite methods|cmae|ccrop] [--variants a,b,...] [--seeds 0,1,2]
                                 [--epochs E] [--out DIR] [--readme docs/results.md] [section.field=value ...]
    make compare / make ablate-cmae / make compare-ccrop        (seeds 0,1,2; docs/results.md tables + plots)

Suites (SUITES below):
  methods  MoCo v2 alone ("plain", mask.enabled=false) and with each masking method (mask.method=M)
  cmae     the CMAE ablation (docs/methods.md §8): MAE baseline (4-block decoder, reconstruction only),
           + smaller decoder (1 block), + contrastive, + position prediction, + ContrastiveCrop
  ccrop    MoCo v2 + MixMask with and without ContrastiveCrop (docs/methods.md §9)
Each cell is ``train.py <the variant's overrides> run.seed=S optim.epochs=E`` on the demo recipe
(configs/demo.yaml + the overlays the overrides name: what ``make train ARGS="..."`` runs, at E epochs:
the same budget in epochs for every variant of a suite), then ``train.py linear eval.augment=false`` on
its checkpoint. Finished runs are not redone, so an interrupted command resumes. Prints a table (mean +-
std over the seeds) and writes OUT/<suite>.json (machine, every run), OUT/<suite>.md and OUT/<suite>.png
(kNN and linear top-1 per variant, error bars = std over seeds). With --readme FILE the table replaces the
text between FILE's <suite> markers and the plot is copied to docs/<suite>.png, linked relative to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import machine, mean_std, write_section
from benchmarks.frameworks import run_logged

FIGURES = ("knn_top1_init", "knn_top1", "linear_top1", "images_per_sec", "train_seconds")
CMAE = ["model.framework=cmae"]
CMAE_NO_AUX = [*CMAE, "cmae.w_contrastive=0", "cmae.w_position=0"]
CCROP = ["ccrop.enabled=true", "ccrop.alpha=0.1", "ccrop.warmup=2", "ccrop.interval=2"]  # small data: alpha 0.1


@dataclass(frozen=True)
class Suite:
    title: str  # what every run is, for the table's caption
    epochs: int  # default epochs of every run
    variants: dict[str, tuple[str, list[str]]]  # name -> (label, train.py overrides)


SUITES = {
    "methods": Suite("MoCo v2, ResNet-10", 8, {
        "plain": ("MoCo v2", ["mask.enabled=false"]),
        "mixmask": ("+ MixMask", ["mask.method=mixmask"]),
        "unmix": ("+ Un-Mix", ["mask.method=unmix"]),
        "unmix_mixmask": ("+ Un-Mix + MixMask", ["mask.method=unmix_mixmask"]),
        "mscn": ("+ MSCN erase", ["mask.method=mscn"]),
        "saliency": ("+ saliency erase, hard negatives", ["mask.method=saliency"]),
        "saliency_mixmask": ("+ saliency-guided MixMask (ours)", ["mask.method=saliency_mixmask"]),
    }),
    "cmae": Suite("CMAE ablation, ViT-Tiny/4 blocks, 4-px patches at 32 px, mask ratio 0.75", 6, {
        "mae": ("MAE (4-block decoder)", [*CMAE_NO_AUX, "cmae.decoder_depth=4"]),
        "small_decoder": ("+ 1-block decoder", [*CMAE_NO_AUX, "cmae.decoder_depth=1"]),
        "contrastive": ("+ contrastive", [*CMAE, "cmae.decoder_depth=1", "cmae.w_position=0"]),
        "position": ("+ position prediction (CMAE)", [*CMAE, "cmae.decoder_depth=1"]),
        "ccrop": ("+ ContrastiveCrop", [*CMAE, "cmae.decoder_depth=1", *CCROP]),
    }),
    "ccrop": Suite("MoCo v2 + MixMask, ResNet-10", 8, {
        "mixmask": ("MoCo v2 + MixMask", ["mask.method=mixmask"]),
        "mixmask_ccrop": ("+ ContrastiveCrop", ["mask.method=mixmask", *CCROP, "ccrop.size=128"]),  # 4 x 4 maps
    }),
}


def markers(suite: str) -> tuple[str, str]:
    return f"<!-- {suite}:start -->", f"<!-- {suite}:end -->"


def run_cell(out: Path, name: str, overrides: list[str], seed: int, epochs: int, extra: list[str]) -> dict:
    """Train + linear-probe one (variant, seed) unless already done; return its figures."""
    run = f"{name}_e{epochs}_s{seed}"
    run_dir = out / "runs" / run
    common = [f"run.out_dir={out / 'runs'}", f"run.name={run}", "run.progress=false", *overrides, *extra]
    summary = run_dir / "summary.json"
    if not summary.is_file():
        print(f"training {run} ...", flush=True)
        run_logged(out / "runs" / f"{run}.log", "train.py", *common, f"run.seed={seed}", f"optim.epochs={epochs}",
                   "run.knn_every=0")
    s = json.loads(summary.read_text())
    ckpt = run_dir / (run_dir / "latest").read_text().strip()
    if not (ckpt / "linear.json").is_file():
        run_logged(out / "runs" / f"{run}.linear.log", "train.py", "linear", *common, "eval.augment=false")
    linear = json.loads((ckpt / "linear.json").read_text())
    return {"run": run, "variant": name, "seed": seed, "epochs": s["epochs"], "knn_top1_init": s["knn_top1_init"],
            "knn_top1": s["knn_top1"], "linear_top1": linear["top1"], "images_per_sec": s["images_per_sec"],
            "train_seconds": s["train_seconds"]}


def markdown(suite: str, table: list[dict], facts: dict, epochs: int, plot: str) -> str:
    def fmt(r, f, digits=1):
        return f"{r[f]:.{digits}f}" + (f" ± {r[f + '_std']:.{digits}f}" if len(r["seeds"]) > 1 else "")

    s, seeds = SUITES[suite], sorted({x for r in table for x in r["seeds"]})
    lines = [f"`python -m benchmarks.methods --suite {suite} --epochs {epochs}` on {facts['date'][:10]}, "
             f"{facts['cores']} cores {facts['cpu']}, {'GPU ' + facts['gpu'] if facts['gpu'] else 'no GPU'}, "
             f"torch {facts['torch']}; {s.title}, demo data, {epochs} epochs each, seeds {seeds} (mean ± std).", "",
             "| variant | kNN before | kNN top-1 | linear top-1 | train img/s | training s |", "|---|---|---|---|---|---|"]
    for r in table:
        label = s.variants[r["variant"]][0] if r["variant"] in s.variants else r["variant"]
        lines.append(f"| {label} (`{r['variant']}`) | {r['knn_top1_init']:.1f} | {fmt(r, 'knn_top1')} | {fmt(r, 'linear_top1')} | "
                     f"{fmt(r, 'images_per_sec', 0)} | {fmt(r, 'train_seconds', 0)} |")
    if plot:
        lines += ["", f"![{suite}]({plot})"]
    return "\n".join(lines) + "\n"


def plot(suite: str, table: list[dict], path: Path, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = range(len(table))
    for i, (f, label) in enumerate((("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"))):
        ax.bar([k + (i - 0.5) * 0.38 for k in x], [r[f] for r in table], 0.38, yerr=[r[f + "_std"] for r in table],
               capsize=3, label=label)
    ax.set_xticks(list(x), [r["variant"] for r in table], rotation=20, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{SUITES[suite].title}: demo, {epochs} epochs, mean ± std over seeds", fontsize=9)
    ax.legend()
    lo = min(min(r["knn_top1"], r["linear_top1"]) for r in table)
    ax.set_ylim(max(0.0, lo - 10), None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="methods", choices=sorted(SUITES))
    ap.add_argument("--variants", "--methods", default="", help="comma-separated subset of the suite's variants")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=0, help="training epochs of every run (0 = the suite's default)")
    ap.add_argument("--out", default="", help="output directory (default bench-out/<suite>)")
    ap.add_argument("--readme", default="",
                    help="put the table between the <suite> markers of this file (docs/results.md), the plot in docs/")
    ap.add_argument("overrides", nargs="*", help="section.field=value passed to every run")
    a = ap.parse_args(argv)
    suite, s = a.suite, SUITES[a.suite]
    names = a.variants.split(",") if a.variants else list(s.variants)
    unknown = sorted(set(names) - set(s.variants))
    if unknown:
        ap.error(f"unknown variants {unknown} of suite {suite}; choose from {list(s.variants)}")
    epochs, out = a.epochs or s.epochs, Path(a.out or f"bench-out/{suite}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = [run_cell(out, n, s.variants[n][1], int(seed), epochs, a.overrides) for seed in a.seeds.split(",")
            for n in names]
    table, facts = mean_std(rows, ("variant",), FIGURES), machine()
    plot(suite, table, out / f"{suite}.png", epochs)
    docs = Path(__file__).resolve().parents[1] / "docs"  # the plots' home; linked relative to the --readme file
    link = os.path.relpath(docs / f"{suite}.png", Path(a.readme).resolve().parent) if a.readme else ""
    md = markdown(suite, table, facts, epochs, link)
    print(md)
    (out / f"{suite}.md").write_text(md)
    if a.readme:
        shutil.copy(out / f"{suite}.png", docs / f"{suite}.png")
        write_section(a.readme, markers(suite), md)
    (out / f"{suite}.json").write_text(json.dumps({"machine": facts, "args": vars(a), "runs": rows, "table": table},
                                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
