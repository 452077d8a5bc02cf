"""A report over training runs: one markdown table row per run, and curves from their metrics.jsonl.

    python -m mixmask.report RUN_DIR_OR_PARENT... --out DIR        -> DIR/report.md + DIR/*.png

A run is a directory with summary.json (train.py cmd_train, finished) or, while unfinished, its
config.yaml / metrics.jsonl / checkpoint-*; a parent of runs is searched one level down.
Table columns: run, framework (config.model.framework), masking (mask.method, "mixmask" in runs older than
the method choice, or "none" when mask.enabled is false), backend (data.backend), epochs, kNN (summary knn_top1), linear, semi-sup 1% /
10% (one column per fraction found), fine-tune (top-1 %), img/s, wall time; "—" where unknown.
Evaluations (evals()) come from <kind>.json / <kind>_<tag>.json ("top1") in the run's latest checkpoint
(train.py cmd_eval / cmd_finetune write linear.json, knn.json, finetune.json, semisup_<percent>.json there)
and from the fine-tuning runs <run>/finetune*/ and <run>/semisup*/ (their summary.json).
Errors: ReportError (a ValueError), one line naming the path.
Plots (plot_runs): loss.png and knn.png (vs step, and vs wall time when the lines carry a unix "time":
minutes since the run's first line), throughput.png (img/s per run); one line per run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

DASH = "—"
KINDS = ("knn", "linear", "finetune", "semisup")
RUN_MARKERS = ("summary.json", "config.yaml", "metrics.jsonl", "latest")


class ReportError(ValueError):
    """A path that does not exist or holds no run (one line, naming the path)."""


def is_run(d: Path) -> bool:
    return d.is_dir() and (any((d / m).is_file() for m in RUN_MARKERS) or any(d.glob("checkpoint-*")))


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path itself if it is a run, else its sub-directories that are runs; ReportError when none."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p}: no such run directory")
        found = [p] if is_run(p) else sorted(d for d in p.iterdir() if is_run(d))
        if not found:
            raise ReportError(f"{p}: holds no run (no summary.json, config.yaml, metrics.jsonl or checkpoint-* "
                             "in it or one level down)")
        runs += found
    return runs


def latest_dir(run: Path) -> Path | None:
    """The checkpoint the ``latest`` file names, else the newest checkpoint-* directory."""
    marker = run / "latest"
    if marker.is_file() and (run / marker.read_text().strip()).is_dir():
        return run / marker.read_text().strip()
    ckpts = sorted(d for d in run.glob("checkpoint-*") if d.is_dir())
    return ckpts[-1] if ckpts else None


def _top1(d: dict, kind: str) -> float | None:
    v = d.get("top1", d.get(f"{kind}_top1"))
    return float(v) if isinstance(v, (int, float)) else None


def _fraction_tag(d: dict, tag: str) -> str:
    """"1%" from {"fraction": 0.01} (or 1, a percentage), else from the file's tag."""
    f = d.get("fraction")
    return f"{f * 100 if f <= 1 else f:g}%" if isinstance(f, (int, float)) else f"{tag}%"


def evals(run: Path) -> dict[str, float]:
    """{"knn" | "linear" | "finetune" | "semisup <p>%": top-1} of a run (later sources override earlier:
    the fine-tuning runs' <run>/finetune*/summary.json and <run>/semisup*/summary.json (train.py
    cmd_finetune), then the latest checkpoint's <kind>.json / <kind>_<tag>.json)."""
    found: list[tuple[str, str, dict]] = []  # (kind, tag, json)
    for s in sorted([*run.glob("finetune*/summary.json"), *run.glob("semisup*/summary.json")]):
        d = json.loads(s.read_text())
        semi = d.get("kind") == "semisup" or (isinstance(d.get("fraction"), (int, float)) and d["fraction"] < 1)
        found.append(("semisup" if semi else "finetune", s.parent.name.partition("_")[2], d))
    ckpt = latest_dir(run)
    for f in sorted(ckpt.glob("*.json")) if ckpt else []:
        m = re.fullmatch(rf"({'|'.join(KINDS)})(?:_(.+))?\.json", f.name)
        if m:
            found.append((m[1], m[2] or "", json.loads(f.read_text())))
    out = {}
    for kind, tag, d in found:
        if (v := _top1(d, kind)) is not None:
            out[f"semisup {_fraction_tag(d, tag)}" if kind == "semisup" else kind] = v
    return out


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl lines, the last one written for each (step, kind) (a resumed run logs steps again)."""
    f, lines = run / "metrics.jsonl", {}
    for line in f.read_text().splitlines() if f.is_file() else []:
        if line.strip():
            d = json.loads(line)
            lines[(d["step"], "knn_top1" in d)] = d
    return sorted(lines.values(), key=lambda d: d["step"])


def collect(run_dirs: list[Path]) -> list[dict]:
    """One row per run (see the module docstring); unknown values are None, unfinished runs say so."""
    rows = []
    for run in find_runs(run_dirs):
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
        started = run / "config.yaml"  # train.py writes the resolved config there when it starts
        stored = summary or (yaml.safe_load(started.read_text()) if started.is_file() else {})
        cfg = stored.get("config", {})
        mask, lines, ev = cfg.get("mask", {}), metrics(run), evals(run)
        s, knn_eval = summary or {}, ev.pop("knn", None)
        epochs = s.get("epochs")
        if summary is None and lines:  # unfinished: how far it got
            epochs = f"{lines[-1]['epoch']}/{cfg.get('optim', {}).get('epochs', '?')}"
        speed = [d["images_per_sec"] for d in lines if "images_per_sec" in d]
        framework = cfg.get("model", {}).get("framework")
        masking = (mask.get("method", "mixmask") if mask.get("enabled") else "none") if mask else None
        kind = stored.get("command")  # a fine-tuning run (train.py finetune / semisup): its own top-1
        if kind in ("finetune", "semisup"):
            framework, masking = f"{kind} of {framework}", None  # its mask section is not used
            if s.get("top1") is not None:
                ev[f"semisup {_fraction_tag(s, '')}" if kind == "semisup" else kind] = s["top1"]
        rows.append({
            "run": run.name, "path": str(run), "status": "done" if summary else "unfinished",
            "framework": framework, "masking": masking,
            "backend": cfg.get("data", {}).get("backend"), "epochs": epochs,
            "knn": s.get("knn_top1", knn_eval), **ev,
            "images_per_sec": s.get("images_per_sec", speed[-1] if speed else None),
            "wall_seconds": s.get("wall_seconds"),
        })
    return rows


def duration(seconds: float) -> str:
    """4m 12s, 1h 05m, 42s."""
    s = round(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _percent(key: str) -> float:
    try:
        return float(key[len("semisup "):-1])
    except ValueError:  # a tag that is not a number sorts last
        return float("inf")


def markdown_table(rows: list[dict]) -> str:
    """The table of the module docstring, one row per collect() row."""
    fractions = sorted({k for r in rows for k in r if k.startswith("semisup ")} | {"semisup 1%", "semisup 10%"},
                       key=_percent)
    top1 = ["knn", "linear", *fractions, "finetune"]
    fmt = {**dict.fromkeys(top1, "{:.1f}"), "images_per_sec": "{:.0f}"}

    def cell(r: dict, k: str) -> str:
        v = r.get(k)
        return DASH if v is None else duration(v) if k == "wall_seconds" else fmt[k].format(v) if k in fmt else str(v)

    keys = ["run", "framework", "masking", "backend", "epochs", *top1, "images_per_sec", "wall_seconds"]
    head = ["run", "framework", "masking", "backend", "epochs", "kNN", "linear",
            *[f"semi-sup {k[8:]}" for k in fractions], "fine-tune", "img/s", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        r = {**r, "run": r["run"] + (" (unfinished)" if r.get("status") == "unfinished" else "")}
        lines.append("| " + " | ".join(cell(r, k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _curves(runs: list[Path], key: str, ylabel: str, path: Path, plt) -> Path | None:
    """key vs step (and vs minutes since the run's first line, when lines carry "time"); None if no data."""
    data = {run.name: [d for d in metrics(run) if isinstance(d.get(key), (int, float))] for run in runs}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return None
    timed = any("time" in d for v in data.values() for d in v)
    fig, axes = plt.subplots(1, 1 + timed, figsize=(5 + 4.5 * timed, 3.6), squeeze=False)
    for i, (name, v) in enumerate(data.items()):  # one colour per run in both panels
        style = {"label": name, "color": plt.get_cmap("tab20")(i % 20), "marker": "." if len(v) < 30 else None}
        axes[0, 0].plot([d["step"] for d in v], [d[key] for d in v], **style)
        t = [d for d in v if "time" in d]
        if timed and t:
            axes[0, 1].plot([(d["time"] - t[0]["time"]) / 60 for d in t], [d[key] for d in t], **style)
    values = [d[key] for v in data.values() for d in v]
    spread = max(abs(x) for x in values) / max(1e-12, min(abs(x) for x in values if x) if any(values) else 1)
    for ax, xlabel in zip(axes[0], ("step", "wall time (min since the first log line)")):
        if key == "loss" and spread > 50:  # frameworks' losses differ by orders of magnitude (Barlow Twins ~1e3)
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """loss.png, knn.png (when kNN was monitored) and throughput.png in out_dir; returns those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = find_runs(run_dirs)
    paths = [_curves(runs, "loss", "loss", out_dir / "loss.png", plt),
             _curves(runs, "knn_top1", "kNN top-1 (%)", out_dir / "knn.png", plt)]
    speed = [(r["run"], r["images_per_sec"]) for r in collect(runs) if r["images_per_sec"] is not None]
    if speed:
        fig, ax = plt.subplots(figsize=(max(4, 1 + 0.8 * len(speed)), 3.6))
        ax.bar(range(len(speed)), [v for _, v in speed])
        ax.set_xticks(range(len(speed)), [n for n, _ in speed], rotation=20, ha="right")
        ax.set_ylabel("train images / s")
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=110)
        plt.close(fig)
        paths.append(out_dir / "throughput.png")
    return [p for p in paths if p is not None]


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """out_dir/report.md: the table and the plots (written beside it)."""
    out_dir = Path(out_dir)
    rows, pngs = collect(run_dirs), plot_runs(run_dirs, out_dir)
    text = "# Runs\n\n" + markdown_table(rows) + "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    (out_dir / "report.md").write_text(text)
    return out_dir / "report.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories, or directories holding runs")
    ap.add_argument("--out", type=Path, default=Path("report"), help="where report.md and the PNGs go")
    a = ap.parse_args(argv)
    try:
        print(write_report(a.runs, a.out))
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
