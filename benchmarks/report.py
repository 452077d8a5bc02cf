"""docs/performance.md's benchmark section from a `python -m benchmarks` run, and two runs compared figure by figure.

    python -m benchmarks.report bench-out/bench.json                  print the markdown
    python -m benchmarks.report bench-out/bench.json --readme docs/performance.md   replace the section between
                                                                      <!-- bench:start --> and <!-- bench:end -->
    python -m benchmarks.report bench-out/bench.json --compare OTHER.json
                                          is each figure of OTHER within this run's noise? (exit 0 either way)

Every measured figure is a median with the min and max of its repeats (the noise). Two runs agree on a
figure when their min-max ranges overlap; --compare prints the figures side by side and counts them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
GPU_START, GPU_END = "<!-- bench-gpu:start -->", "<!-- bench-gpu:end -->"  # runs on a GPU have their own section


def _rng(r: dict, fmt: str = "{:.0f}") -> str:
    """'median (min-max)' of a row with images_per_sec/min/max."""
    med = r["images_per_sec"]
    if "min" not in r:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(r['min'])}-{fmt.format(r['max'])})"


def render(b: dict, chart: str = "") -> str:
    m, a = b["machine"], b["args"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    d = b.get("dataset")
    data = (f"{d['files']} generated ImageNet-like JPEGs (mean {d['mean_wh'][0]:.0f} x {d['mean_wh'][1]:.0f} px, "
            f"{d['mean_kb']:.0f} KB)" if d else f"{a['images']} generated JPEGs")
    lines = [
        f"`python -m benchmarks` on {m['date'][:10]}, {m['cores']} cores {m['cpu']}{gpu}, torch {m['torch']}, "
        f"DALI {m.get('dali') or '-'}, ffcv {m.get('ffcv') or '-'}. Loaders: {data}, two views "
        f"at {a['size']} px, batch {a['batch']}, median (min-max) of {a['repeats']} epochs after a warm-up epoch. "
        f"Training step: MoCo v2 + MixMask {a['arch']} at {a['train_size']} px, batch {a['train_batch']}, "
        f"{'fp32' if a['precision'] == 'no' else a['precision']}, on {a['device']}, median (min-max) of {a.get('train_repeats', 3)} runs of "
        f"{a['steps']} steps; share of ceiling = median images/s fed by the loader / median images/s fed one "
        "synthetic batch already on the device.",
        "",
        "| loader | MixMask off img/s | MixMask on img/s | per core (on) | on, vs first row | training img/s "
        "| share of ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    train = {r["feed"]: r for r in b["training"] if variant(r) == "mixmask"}
    syn_off = next((r for r in b["training"] if r["feed"] == "synthetic" and variant(r) == "plain"), None)
    ceil = train.get("synthetic")
    if ceil:
        lines.append(f"| synthetic batch (model-only ceiling) | | | | | {_rng(ceil, '{:.1f}')} | 1.00 |")
        if syn_off:
            lines.append(f"| synthetic batch, MixMask off (plain MoCo v2) | | | | | {_rng(syn_off, '{:.1f}')} | "
                         f"{syn_off['share_of_ceiling']:.2f} |")
    for name in dict.fromkeys(r["backend"] for r in b["loaders"]):
        off = next(r for r in b["loaders"] if r["backend"] == name and not r["mixmask"])
        on = next(r for r in b["loaders"] if r["backend"] == name and r["mixmask"])
        t = train.get(name)
        tcell = f"{_rng(t, '{:.1f}')} | {t['share_of_ceiling']:.2f}" if t else " | "
        lines.append(f"| {name} | {_rng(off)} | {_rng(on)} | {on['per_core']:.1f} | "
                     f"{on['vs_baseline']:.2f} | {tcell} |")
    for backend in ("cpu", "cuda"):
        ks = [r for r in b["kernels"] if r.get("backend") == backend and r.get("variant", "vector") == "vector"]
        top = max((r.get("threads", 0) for r in ks), default=0)
        ks = [r for r in ks if r.get("threads", 0) == top]  # CPU: the all-thread rows
        if not ks:
            continue
        parts = []
        for r in ks:
            noise = f" ({r['fused_ms_min']:.2f}-{r['fused_ms_max']:.2f})" if "fused_ms_min" in r else ""
            torch_x = f", {r['speedup_vs_torch']:.0f}x the torch ops" if r.get("speedup_vs_torch") else ""
            parts.append(f"{r['dtype']} {r['fused_ms']:.2f} ms{noise}, {r['fused_over_copy']:.2f} of a copy{torch_x}")
        lines += ["", f"Fused normalise + mix kernel in the same run ({ks[0]['n']} x {ks[0]['size']} x {ks[0]['size']}, "
                  f"{backend.upper()}, ms median (min-max)): " + "; ".join(parts) + "."]
    lines += ["", *training_table(b)]
    if b.get("epochs"):
        lines += ["", *epoch_table(b["epochs"], b.get("epochs_run", ""))]
    best = b.get("best_loader")
    if best:
        lines += ["", f"Best loader in the training step: {best['feed']} ({best.get('variant', 'mixmask')}), at "
                  f"{best['share_of_ceiling']:.2f} of the model-only ceiling (target on a GPU: >= {best['target']})."]
    if chart:
        lines += ["", f"Chart of this run: `{chart}`."]
    return "\n".join(lines)


def variant(r: dict) -> str:
    """A training row's variant (runs before the variants had only MixMask on/off)."""
    return r.get("variant", "mixmask" if r["mixmask"] else "plain")


def training_table(b: dict) -> list[str]:
    """The training step by variant and feed: img/s, share of the same variant's synthetic ceiling, the
    host's ms per step outside the device work against the step's ms, the first step (compilation)."""
    rows = b["training"]
    lines = ["Training step by option (benchmarks/training.py; variant = MixMask on/off + options; share = of the "
             "same variant's synthetic-feed ceiling; host ms: the step's time outside the device work):", "",
             "| feed | variant | img/s median (min-max) | share of ceiling | host ms / step ms | first step s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        host = "-" if r.get("host_ms") is None else f"{r['host_ms']:.1f}"
        step = f"{r['step_ms']:.1f}" if "step_ms" in r else "-"
        first = f"{r['first_step_s']:.1f}" if "first_step_s" in r else "-"
        lines.append(f"| {r['feed']} | {variant(r)} | {_rng(r, '{:.1f}')} | {r['share_of_ceiling']:.2f} | "
                     f"{host} / {step} | {first} |")
    return lines


def epochs_from(training: dict) -> tuple[list[dict], str]:
    """The epoch rows of a separate ``python -m benchmarks.training --epoch-sizes ...`` run (its --json) and the
    label that names it: (rows, "rerun alone, DATE: `command`")."""
    if not training.get("epochs"):
        raise SystemExit("error: --epochs: that JSON has no epoch rows (python -m benchmarks.training --epoch-sizes ...)")
    a = training.get("args", {})
    command = (f"python -m benchmarks.training --json PATH --variants '' --backends '' --epoch-sizes "
               f"{a.get('epoch_sizes', '')} --epoch-repeats {a.get('epoch_repeats', '')}")
    return training["epochs"], f"rerun alone, {training['machine']['date'][:16].replace('T', ' ')}: `{command}`"


def epoch_table(rows: list[dict], run: str = "") -> list[str]:
    """Progressive resolution's effect: one demo epoch at each view size (run: where the rows come from when
    not from this run)."""
    lines = [f"One demo epoch ({rows[0]['images']} images of the demo recipe, its torchvision loader + ResNet-10 "
             f"step) by view size, what progressive resolution (data.size_start) saves per epoch"
             + (f" ({run})" if run else "") + ":", "",
             "| view px | epoch s median (min-max) | img/s | of the largest size's epoch |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['epoch_s']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {r['images_per_sec']:.0f} | "
                     f"{r['vs_full']:.2f} |")
    return lines


def figures(b: dict) -> dict[str, dict]:
    """Every measured figure of a run with its noise: name -> {"median", "min", "max", "unit"}."""
    def ips(r: dict) -> dict:
        med = r["images_per_sec"]
        return {"median": med, "min": r.get("min", med), "max": r.get("max", med), "unit": "img/s"}

    out = {f"loader {r['backend']} mixmask {'on' if r['mixmask'] else 'off'}": ips(r) for r in b["loaders"]}
    out |= {f"training {r['feed']} {variant(r)}": ips(r) for r in b["training"]}
    out |= {f"demo epoch {r['size']} px": {"median": r["epoch_s"], "min": r["min"], "max": r["max"], "unit": "s"}
            for r in b.get("epochs", [])}
    for r in b["kernels"]:
        name = f"kernel {r['backend']} {r.get('variant', r.get('threads', ''))} {r['dtype']}".replace("  ", " ")
        out[name] = {"median": r["fused_ms"], "min": r.get("fused_ms_min", r["fused_ms"]),
                     "max": r.get("fused_ms_max", r["fused_ms"]), "unit": "ms"}
    return out


def compare(a: dict, b: dict) -> list[dict]:
    """The figures both runs measured: a's and b's spreads, b's median / a's, and whether the ranges overlap."""
    fa, fb = figures(a), figures(b)
    rows = []
    for name in fa:
        if name not in fb:
            continue
        x, y = fa[name], fb[name]
        rows.append({"figure": name, "unit": x["unit"], "a": x, "b": y, "ratio": y["median"] / x["median"],
                     "overlap": x["min"] <= y["max"] and y["min"] <= x["max"]})
    return rows


def print_comparison(rows: list[dict], label_a: str = "this run", label_b: str = "other run") -> None:
    print(f"{'figure':34} {'unit':5} {label_a + ' median (min-max)':>28} {label_b + ' median (min-max)':>28} "
          f"{'ratio':>6}  ranges overlap")
    for r in rows:
        a, b = r["a"], r["b"]
        print(f"{r['figure']:34} {r['unit']:5} {a['median']:12.4g} ({a['min']:6.4g}-{a['max']:6.4g}) "
              f"{b['median']:12.4g} ({b['min']:6.4g}-{b['max']:6.4g}) {r['ratio']:6.2f}  "
              f"{'yes' if r['overlap'] else 'NO'}")
    n_ok = sum(r["overlap"] for r in rows)
    print(f"{n_ok} of {len(rows)} figures within the other run's noise (min-max ranges overlap)")


def update_readme(readme: Path, text: str, gpu: bool = False) -> None:
    """Replace the CPU section (or, for a run on a GPU, the GPU section) of readme by text."""
    from benchmarks import write_section

    write_section(readme, (GPU_START, GPU_END) if gpu else (START, END), text + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--readme", help="markdown file to update in place (docs/performance.md)")
    ap.add_argument("--chart", default="", help="path of the chart to mention; with --copy-chart, where the run's "
                    "bench.png is copied (default docs/bench.png, docs/bench-gpu.png for a GPU run)")
    ap.add_argument("--copy-chart", action="store_true", help="copy bench.png from beside the JSON to --chart")
    ap.add_argument("--compare", metavar="OTHER_JSON", help="another run's bench.json: figures side by side")
    ap.add_argument("--epochs", metavar="TRAINING_JSON", help="take the demo-epoch rows from a separate "
                    "`python -m benchmarks.training --epoch-sizes ...` run (its --json), named in the text")
    a = ap.parse_args(argv)
    bench = json.loads(Path(a.bench_json).read_text())
    if a.epochs:
        bench["epochs"], bench["epochs_run"] = epochs_from(json.loads(Path(a.epochs).read_text()))
    if a.compare:
        print_comparison(compare(bench, json.loads(Path(a.compare).read_text())), Path(a.bench_json).stem,
                         Path(a.compare).stem)
        return 0
    gpu = bool(bench["machine"].get("gpu"))
    if a.copy_chart:
        import shutil

        a.chart = a.chart or ("docs/bench-gpu.png" if gpu else "docs/bench.png")
        shutil.copyfile(Path(a.bench_json).with_name("bench.png"), a.chart)
    text = render(bench, a.chart)
    if a.readme:
        update_readme(Path(a.readme), text, gpu)
        print(f"updated the {'GPU ' if gpu else ''}section of {a.readme}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
