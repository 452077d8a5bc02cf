"""mixmask/report.py on fake run directories: two finished runs under a parent, one unfinished, one
finished run passed on its own; the table's cells, the evaluation lookup, the PNGs and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mixmask.report import ReportError, collect, evals, markdown_table, plot_runs, write_report

T0 = 1_700_000_000.0


def config(framework="moco_v2", enabled=True, method="mixmask", backend="torchvision", epochs=8) -> dict:
    return {"config": {"model": {"framework": framework}, "mask": {"enabled": enabled, "method": method},
                       "data": {"backend": backend}, "optim": {"epochs": epochs}}, "derived": {}, "git_sha": "abc"}


def run_dir(root: Path, name: str, summary: dict | None, lines: list[dict], cfg: dict) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if summary is not None:
        (d / "summary.json").write_text(json.dumps({**summary, **cfg}))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def write(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    parent = tmp_path / "runs"
    timed = [{"step": s, "epoch": s // 10, "loss": 5.0 - s / 10, "images_per_sec": 900.0, "lr": 0.1,
              "time": T0 + 3 * s} for s in (10, 20, 30)]
    timed.append({"step": 20, "epoch": 2, "knn_top1": 30.0, "time": T0 + 61})
    facts = {"epochs": 8, "steps": 30, "images_per_sec": 1234.5, "train_seconds": 200.0, "knn_top1": 41.23,
             "knn_top1_init": 10.0, "wall_seconds": 252.4}
    mm = run_dir(parent, "mixmask_run", facts, timed, config())
    write(mm / "checkpoint-00000010" / "linear.json", {"top1": 1.0})  # an older checkpoint: not read
    write(mm / "checkpoint-00000030" / "linear.json", {"top1": 55.54, "checkpoint": "x"})
    write(mm / "checkpoint-00000030" / "semisup_1.json", {"top1": 20.04, "fraction": 0.01})
    write(mm / "checkpoint-00000030" / "semisup_10.json", {"top1": 33.36})  # the tag gives the fraction
    write(mm / "checkpoint-00000030" / "knn.json", {"knn_top1": 99.0})  # the summary's kNN wins
    (mm / "latest").write_text("checkpoint-00000030\n")
    untimed = [{"step": 5, "epoch": 0, "loss": 6.0}, {"step": 10, "epoch": 1, "loss": 5.5}]
    plain = run_dir(parent, "plain_run", {"epochs": 8, "images_per_sec": 2000.0, "knn_top1": 38.0,
                                          "wall_seconds": 3725}, untimed, config(enabled=False, backend="dali"))
    write(plain / "finetune_full" / "summary.json", {"top1": 70.12})
    run_dir(parent, "crashed", None, untimed, config(framework="byol", method="unmix"))
    (parent / "notes.txt").write_text("not a run")
    lone = run_dir(tmp_path / "elsewhere", "lone", {"epochs": 1, "images_per_sec": 10.0, "knn_top1": 12.0,
                                                     "wall_seconds": 42.2}, [], config(framework="simsiam"))
    return parent, lone


def table_cells(md: str) -> dict[str, dict[str, str]]:
    lines = [line.strip("|").split("|") for line in md.strip().splitlines()]
    head = [h.strip() for h in lines[0]]
    return {c[0].strip(): dict(zip(head, (x.strip() for x in c))) for c in lines[2:]}


def test_table_rows_and_values(runs):
    parent, lone = runs
    md = markdown_table(collect([parent, lone]))
    rows = table_cells(md)
    assert list(rows) == ["crashed (unfinished)", "mixmask_run", "plain_run", "lone"]
    assert len(md.strip().splitlines()) == 2 + 4  # each run exactly once
    head = md.splitlines()[0]
    assert head == ("| run | framework | masking | backend | epochs | kNN | linear | semi-sup 1% | semi-sup 10% | "
                    "fine-tune | img/s | wall time |")
    assert rows["mixmask_run"] == {
        "run": "mixmask_run", "framework": "moco_v2", "masking": "mixmask", "backend": "torchvision", "epochs": "8",
        "kNN": "41.2", "linear": "55.5", "semi-sup 1%": "20.0", "semi-sup 10%": "33.4", "fine-tune": "—",
        "img/s": "1234", "wall time": "4m 12s"}
    p = rows["plain_run"]
    assert (p["masking"], p["backend"], p["linear"], p["semi-sup 1%"], p["fine-tune"], p["wall time"]) == \
        ("none", "dali", "—", "—", "70.1", "1h 02m")
    c = rows["crashed (unfinished)"]
    assert (c["framework"], c["masking"], c["epochs"], c["kNN"], c["img/s"], c["wall time"]) == \
        ("byol", "unmix", "1/8", "—", "—", "—")
    assert rows["lone"]["wall time"] == "42s" and rows["lone"]["framework"] == "simsiam"


def test_eval_lookup_without_latest_takes_the_newest_checkpoint(tmp_path):
    write(tmp_path / "checkpoint-00000100" / "linear.json", {"top1": 50.0})
    write(tmp_path / "checkpoint-00000200" / "linear_noaug.json", {"top1": 60.0})
    write(tmp_path / "checkpoint-00000200" / "semisup_x.json", {"top1": 5.0, "fraction": 0.1})
    write(tmp_path / "checkpoint-00000200" / "other.json", {"top1": 1.0})
    write(tmp_path / "semisup_25" / "summary.json", {"top1": 40.0, "kind": "semisup", "fraction": 0.25})
    write(tmp_path / "finetune" / "summary.json", {"top1": 80.0, "kind": "finetune", "fraction": 1.0})
    assert evals(tmp_path) == {"linear": 60.0, "semisup 10%": 5.0, "semisup 25%": 40.0, "finetune": 80.0}
    md = markdown_table([{"run": "r", **evals(tmp_path)}])  # a fraction column beyond 1% / 10%
    assert "| semi-sup 1% | semi-sup 10% | semi-sup 25% | fine-tune |" in md and "| 5.0 | 40.0 | 80.0 |" in md


def test_pngs_and_report(runs, tmp_path):
    parent, lone = runs
    report = write_report([parent, lone], tmp_path / "out")
    text = report.read_text()
    names = ["loss.png", "knn.png", "throughput.png"]
    for name in names:
        assert f"({name})" in text
        with Image.open(tmp_path / "out" / name) as im:
            im.verify()
            assert im.size[0] > 0 and im.size[1] > 0
    # with a "time" key the curves get a second panel (vs wall time); without one they do not
    wide = Image.open(tmp_path / "out" / "loss.png").size[0]
    assert [p.name for p in plot_runs([parent / "plain_run"], tmp_path / "untimed")] == ["loss.png", "throughput.png"]
    assert Image.open(tmp_path / "untimed" / "loss.png").size[0] < wide


def test_bad_paths(tmp_path):
    assert issubclass(ReportError, ValueError)
    with pytest.raises(ReportError, match="nope: no such run directory"):
        collect([tmp_path / "nope"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty: holds no run"):
        collect([tmp_path / "empty"])


def test_a_fine_tuning_run_reports_its_own_top1(tmp_path):
    """train.py finetune / semisup write a summary with command, kind, fraction and top1: the row shows it
    in its column and says what was fine-tuned (its mask section is not used: no masking)."""
    cfg = {**config(backend="ffcv"), "command": "semisup"}
    run_dir(tmp_path, "semisup_10", {"epochs": 30, "top1": 61.44, "kind": "semisup", "fraction": 0.1,
                                     "images_per_sec": 400.0, "wall_seconds": 35}, [], cfg)
    cfg = {**config(), "command": "finetune"}
    run_dir(tmp_path, "finetune", {"epochs": 8, "top1": 90.4, "kind": "finetune", "fraction": 1.0,
                                   "images_per_sec": 548.0, "wall_seconds": 74}, [], cfg)
    rows = {r["run"]: r for r in collect([tmp_path])}
    assert rows["semisup_10"]["semisup 10%"] == 61.44 and rows["semisup_10"]["framework"] == "semisup of moco_v2"
    assert rows["finetune"]["finetune"] == 90.4 and rows["finetune"]["masking"] is None
    table = markdown_table(list(rows.values()))
    assert "| finetune | finetune of moco_v2 | — | torchvision | 8 | — | — | — | — | 90.4 | 548 | 1m 14s |" in table
