"""README's benchmark section, generated from a `python -m benchmarks` run.

    python -m benchmarks.report bench-out/bench.json                  print the markdown
    python -m benchmarks.report bench-out/bench.json --readme README.md   replace the section between
                                                                      <!-- bench:start --> and <!-- bench:end -->
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def render(b: dict, chart: str = "") -> str:
    m, a = b["machine"], b["args"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    lines = [
        f"`python -m benchmarks` on {m['date'][:10]}, {m['cores']} cores {m['cpu']}{gpu}, torch {m['torch']}, "
        f"DALI {m.get('dali') or '-'}, ffcv {m.get('ffcv') or '-'}. Loaders: {a['images']} generated JPEGs, two views "
        f"at {a['size']} px, batch {a['batch']}, median of {a['repeats']} epochs. Training step: MoCo v2 + MixMask "
        f"{a['arch']} at {a['train_size']} px, batch {a['train_batch']}, precision {a['precision']}, on {a['device']}; "
        "share of ceiling = images/s fed by the loader / images/s fed one synthetic batch already on the device.",
        "",
        "| loader | MixMask off img/s | MixMask on img/s | per core (on) | on, vs first row | training img/s (share of ceiling) |",
        "|---|---|---|---|---|---|",
    ]
    train = {r["feed"]: r for r in b["training"] if r["mixmask"]}
    syn_off = next((r for r in b["training"] if r["feed"] == "synthetic" and not r["mixmask"]), None)
    ceil = train.get("synthetic")
    if ceil:
        plain = f"; plain MoCo v2 {syn_off['images_per_sec']:.1f} ({syn_off['share_of_ceiling']:.2f})" if syn_off else ""
        lines.append(f"| synthetic batch (model-only ceiling) | | | | | {ceil['images_per_sec']:.1f} (1.00){plain} |")
    for name in dict.fromkeys(r["backend"] for r in b["loaders"]):
        off = next(r for r in b["loaders"] if r["backend"] == name and not r["mixmask"])
        on = next(r for r in b["loaders"] if r["backend"] == name and r["mixmask"])
        t = train.get(name)
        tcell = f"{t['images_per_sec']:.1f} ({t['share_of_ceiling']:.2f})" if t else ""
        lines.append(f"| {name} | {off['images_per_sec']:.1f} | {on['images_per_sec']:.1f} | {on['per_core']:.1f} | "
                     f"{on['vs_baseline']:.2f} | {tcell} |")
    ks = [r for r in b["kernels"] if r.get("backend") == "cpu"]
    if ks:
        parts = [f"{r['dtype']} {r['fused_ms']:.1f} ms ({r['fused_over_copy']:.2f} of a copy"
                 + (f", {r['speedup_vs_torch']:.0f}x the torch ops)" if r.get("speedup_vs_torch") else ")") for r in ks]
        lines += ["", f"Fused kernel in the same run ({ks[0]['n']} x {ks[0]['size']} x {ks[0]['size']}, CPU): "
                  + "; ".join(parts) + "."]
    if chart:
        lines += ["", f"Chart of this run: `{chart}`."]
    return "\n".join(lines)


def update_readme(readme: Path, text: str) -> None:
    s = readme.read_text()
    if START not in s or END not in s:
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    head, rest = s.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--readme", help="README to update in place")
    ap.add_argument("--chart", default="", help="path of the chart to mention")
    a = ap.parse_args(argv)
    text = render(json.loads(Path(a.bench_json).read_text()), a.chart)
    if a.readme:
        update_readme(Path(a.readme), text)
        print(f"updated {a.readme}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
