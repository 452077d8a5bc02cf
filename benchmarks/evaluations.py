"""Every evaluation protocol on the demo checkpoint, read through every backend (docs/methods.md §11).

    python -m benchmarks.evaluations [--backends torchvision,dali,ffcv] [--evals knn,linear,finetune,semisup_1,semisup_10]
                                     [--checkpoint PATH] [--out bench-out/evaluations] [--readme README.md]
                                     [section.field=value ...]
    make evaluate     (writes the table into README.md)

Without --checkpoint the demo is pretrained first (``train.py`` on configs/demo.yaml: MoCo v2 + MixMask,
exactly ``make train``) into OUT/pretrain. For each backend the checkpoint's weights and config are linked
into OUT/<backend>/checkpoint/ and each protocol runs on it with ``data.backend=<backend>``:

    knn          train.py knn
    linear       train.py linear eval.augment=false          (cached centre-crop features, 100 epochs)
    finetune     train.py finetune                           (every label; configs/demo.yaml's finetune section)
    semisup_1    train.py semisup finetune.fraction=0.01 ... (50 labelled images, SEMISUP below)
    semisup_10   train.py semisup finetune.fraction=0.1 ...  (500 labelled images)

The last row (``--baseline``, on by default) is the same protocols on the torchvision backend from the
untrained model (the checkpoint's architecture and framework, initialised with the same seed as the
pretraining): what the pretraining adds. Finished evaluations (their JSON present) are not redone, so an
interrupted command resumes. Prints the table and writes OUT/evaluations.json (every figure) and
OUT/evaluations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks import machine, write_section
from benchmarks.frameworks import run_logged

MARKERS = ("<!-- evaluations:start -->", "<!-- evaluations:end -->")
# the semi-supervised settings: SimCLR's epochs (60 on 1%, 30 on 10%), batches the subsets can fill
SEMISUP = {
    "semisup_1": ["finetune.fraction=0.01", "finetune.epochs=60", "finetune.batch_size=16"],
    "semisup_10": ["finetune.fraction=0.1", "finetune.epochs=30", "finetune.batch_size=32"],
}
ARGS = {"knn": ["knn"], "linear": ["linear", "eval.augment=false"], "finetune": ["finetune"],
        **{k: ["semisup", *v] for k, v in SEMISUP.items()}}
COLUMNS = {"knn": "kNN", "linear": "linear", "semisup_1": "semi-sup 1%", "semisup_10": "semi-sup 10%",
           "finetune": "fine-tune"}


def pretrain(out: Path, extra: list[str]) -> Path:
    """The demo checkpoint (trained once into OUT/pretrain)."""
    run = out / "pretrain"
    if not (run / "summary.json").is_file():
        print("pretraining the demo ...", flush=True)
        run_logged(out / "pretrain.log", "train.py", f"run.out_dir={out}", "run.name=pretrain", "run.progress=false",
                   *extra)
    return run / (run / "latest").read_text().strip()


def link_checkpoint(src: Path, dst: Path) -> None:
    """dst/ gets src's weights and config (hard links where possible): each backend writes its own results."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        if not (dst / name).exists():
            try:
                os.link(src / name, dst / name)
            except OSError:
                (dst / name).write_bytes((src / name).read_bytes())


def random_init(out: Path, ckpt: Path) -> Path:
    """OUT/random_init/checkpoint: the checkpoint's model as it was before training (same config and seed)."""
    dst = out / "random_init" / "checkpoint"
    if not (dst / "model.safetensors").is_file():
        import torch
        from safetensors.torch import save_file

        import train
        from mixmask.config import Config, apply_overrides

        stored = json.loads((ckpt / "config.json").read_text())
        cfg = Config()
        apply_overrides(cfg, stored["config"], str(ckpt / "config.json"))
        torch.manual_seed(cfg.run.seed)  # as train.py's set_seed before build_model
        model = train.build_model(cfg, 1)
        dst.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "model.safetensors"))
        (dst / "config.json").write_text(json.dumps(stored, indent=2))
    return dst


def evaluate(out: Path, ckpt: Path, backend: str, kind: str, extra: list[str], label: str = "") -> dict:
    here = out / (label or backend) / "checkpoint"
    link_checkpoint(ckpt, here)
    result = here / f"{kind}.json"
    if not result.is_file():
        print(f"{backend}: {kind} ...", flush=True)
        command, *args = ARGS[kind]
        run_logged(here.parent / f"{kind}.log", "train.py", command, f"eval.checkpoint={here}",
                   f"data.backend={backend}", f"run.out_dir={here.parent}", "run.progress=false", *args, *extra)
    r = json.loads(result.read_text())
    top1 = r.get("top1", r.get("knn_top1"))
    return {"backend": f"{backend}, {label.replace('_', ' ')}" if label else backend, "eval": kind, "top1": top1, "images_per_sec": r.get("images_per_sec"),
            "wall_seconds": r.get("wall_seconds"), "labelled_images": r.get("labelled_images"),
            "epochs": r.get("epochs")}


def markdown(rows: list[dict], evals: list[str], facts: dict, pre: dict) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    by = {(r["backend"], r["eval"]): r for r in rows}
    head = " | ".join(COLUMNS[e] for e in evals)
    lines = [f"`python -m benchmarks.evaluations` on {facts['date'][:10]}, {facts['cores']} cores {facts['cpu']}, "
             f"{'GPU ' + facts['gpu'] if facts['gpu'] else 'no GPU'}, torch {facts['torch']}; one demo checkpoint "
             f"(MoCo v2 + MixMask, {pre['epochs']} epochs, kNN {pre['knn_top1_init']:.1f} -> {pre['knn_top1']:.1f} "
             f"during training), one run per cell; top-1 % on the validation images; the last row starts from the "
             f"untrained model.", "",
             f"| backend | {head} | fine-tune img/s |", "|---" * (len(evals) + 2) + "|"]
    for b in backends:
        cells = [f"{by[(b, e)]['top1']:.1f}" if (b, e) in by else "—" for e in evals]
        ft = by.get((b, "finetune"), {}).get("images_per_sec")
        lines.append(f"| {b} | {' | '.join(cells)} | {f'{ft:.0f}' if ft else '—'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="torchvision,dali,ffcv")
    ap.add_argument("--evals", default="knn,linear,semisup_1,semisup_10,finetune")
    ap.add_argument("--checkpoint", default="", help="a checkpoint folder (default: pretrain the demo)")
    ap.add_argument("--out", default="bench-out/evaluations")
    ap.add_argument("--baseline", default=True, action=argparse.BooleanOptionalAction,
                    help="also evaluate the untrained model (torchvision backend)")
    ap.add_argument("--readme", default="", help="put the table between README's evaluations markers")
    ap.add_argument("overrides", nargs="*", help="section.field=value passed to every command")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    evals = a.evals.split(",")
    unknown = [e for e in evals if e not in ARGS]
    if unknown:
        raise SystemExit(f"error: unknown evaluation {unknown[0]!r} (known: {', '.join(ARGS)})")
    ckpt = Path(a.checkpoint).resolve() if a.checkpoint else pretrain(out, a.overrides)
    summary = ckpt.parent / "summary.json"
    pre = json.loads(summary.read_text()) if summary.is_file() else {"epochs": "?", "knn_top1_init": float("nan"),
                                                                     "knn_top1": float("nan")}
    rows = [evaluate(out, ckpt, b, e, a.overrides) for b in a.backends.split(",") for e in evals]
    if a.baseline:
        init = random_init(out, ckpt)
        rows += [evaluate(out, init, "torchvision", e, a.overrides, label="random_init") for e in evals]
    facts = machine()
    md = markdown(rows, evals, facts, pre)
    print(md)
    (out / "evaluations.md").write_text(md)
    if a.readme:
        write_section(a.readme, MARKERS, md)
    (out / "evaluations.json").write_text(json.dumps({"machine": facts, "args": vars(a), "checkpoint": str(ckpt),
                                                      "pretrain": {k: pre.get(k) for k in ("epochs", "knn_top1_init", "knn_top1")},
                                                      "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
