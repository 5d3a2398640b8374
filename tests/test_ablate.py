"""The ablation runner at micro scale, and the report's statistics, verdicts and figures read from files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tlm.studies.ablate import run_local
from tlm.studies.catalogue import EQUIVALENCE_MARGIN, planned_runs, slug, studies
from tlm.studies.plots import _curve
from tlm.studies.report import load_run
from tlm.studies.verdicts import verdict
from tlm.cli import main
from tlm.training.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_every_study_is_derived_from_the_base_recipe() -> None:
    base = load_config(REPO / "configs" / "ablations" / "cpu.yaml")
    known = studies(base)
    assert list(known) == ["lr", "batch", "norm", "norm_position", "position", "mlp", "kv_heads", "yarn", "documents",
                           "optimizer"]
    optimizer = known["optimizer"].variants
    assert optimizer["adamw"] == {"eval.every": 50} and len(optimizer) == 6
    assert optimizer["muon lr=0.1"] == {"optim.name": "muon", "eval.every": 50, "optim.muon_lr": 0.1}
    assert known["documents"].variants == {"mask": {"train.document_masking": "mask"}, "cross-document": {}}
    assert known["lr"].variants[known["lr"].baseline] == {} and len(known["lr"].variants) == 5
    assert set(known["kv_heads"].variants) == {"kv_heads=1", "kv_heads=2", "kv_heads=4", "kv_heads=8"}
    batch = known["batch"].variants
    assert batch["batch=32"] == {"batch.global_batch_size": 32, "batch.micro_batch_size": 16, "train.max_steps": 450}
    assert known["norm_position"].variants["post lr=0.015"] == {"model.norm_position": "post", "optim.lr": 0.015}


def test_shared_settings_are_trained_once() -> None:
    runs = planned_runs(["lr", "norm_position", "norm"], "cpu", seeds=2)
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names))
    # lr: 5 settings; pre-norm's three learning rates are among them; post-norm adds 3; norm adds "none".
    assert len(names) == 2 * (5 + 3 + 1)
    assert "base-seed0" in names and "lr=0.0006-seed1" in names and slug({"model.norm": "none"}) == "norm=none"
    assert all(r["overrides"]["train.seed"] in (0, 1) for r in runs)


def test_a_run_claimed_by_another_process_is_skipped(tmp_path: Path) -> None:
    import fcntl

    run = planned_runs(["norm"], "cpu", seeds=1)[0]
    run_dir = tmp_path / "runs" / run["name"]
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as lock:  # as another `tlm ablate` on the same folder would hold it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_local([run], "cpu", tmp_path) == []
    assert not (run_dir / "summary.json").exists()


def test_micro_scale_run_then_report_reads_the_metrics(tmp_path: Path, prepared: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ablations"
    args = ["ablate", "norm", "--seeds", "1", "--out", str(out), f"--data.prepared={prepared}", "--data.seq_len=64",
            "--train.max_steps=4", "--eval.every=2", "--eval.max_batches=2", "--train.compile=false",
            "--train.precision=fp32"]
    main(args)
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = Path(figures["report"])
    text = report.read_text()
    runs = {name: load_run(out / "runs" / f"{name}-seed0") for name in ("base", "norm=none")}
    for run in runs.values():
        assert f"{run['final_val']:.4f} +- 0.0000" in text  # the table holds the values written to metrics.jsonl
        xs, ys, lo, hi = _curve([run], "val")
        logged = [r for r in (run["dir"] / "metrics.jsonl").read_text().splitlines() if "val_loss" in r]
        assert ys == [json.loads(r)["val_loss"] for r in logged] and lo == hi == ys
    assert (report.parent / "norm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report.parent / "runs" / "base-seed0" / "metrics.jsonl").is_file()

    # Rewrite the written metrics: the report must follow them, figures included.
    metrics = out / "runs" / "norm=none-seed0" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["val_loss"] = 1.2345
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = (report.parent / "norm.png").read_bytes()
    main(["ablate", "report", "--seeds", "1", "--out", str(out)])
    capsys.readouterr()
    assert "| none | 1 | 1.2345 +- 0.0000 |" in report.read_text()
    assert (report.parent / "norm.png").read_bytes() != before

    # A second run of the study trains nothing: every run is complete.
    main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trained"] == []


def run(finals: list[float], start: float = 8.0, nan: bool = False) -> list[dict]:
    return [{"dir": Path("x"), "seed": seed, "final_val": f, "train": [{"loss": math.nan if nan else f, "tokens_seen": 1}],
             "val": [{"val_loss": start, "tokens_seen": 0}, {"val_loss": f, "tokens_seen": 1}]}
            for seed, f in enumerate(finals)]


def test_verdicts_follow_the_stated_rules() -> None:
    known = studies(load_config(REPO / "configs" / "ablations" / "cpu.yaml"))
    norm = known["norm"]
    assert verdict(norm, {"rmsnorm": run([5.0, 5.1, 5.2]), "none": run([5.5, 5.65, 5.7])}, {})[0] == "reproduced"
    assert verdict(norm, {"rmsnorm": run([5.0, 5.1, 5.2]), "none": run([4.5, 4.65, 4.7])}, {})[0] == "not reproduced"
    assert verdict(norm, {"rmsnorm": run([5.0, 5.1, 5.2]), "none": run([5.5, 5.0, 5.1])}, {})[0] == "inconclusive"
    assert verdict(norm, {"rmsnorm": [], "none": run([5.0])}, {})[0] == "no data"
    # Paired by seed: a missing seed drops its pair, it does not shift the others.
    partial = {"rmsnorm": run([5.0, 5.1, 5.2]), "none": [r for r in run([5.5, 9.9, 5.7]) if r["seed"] != 1]}
    assert "+0.5000" in verdict(norm, partial, {})[1][0]

    kv = studies(load_config(REPO / "configs" / "ablations" / "cpu.yaml"))["kv_heads"]
    m = EQUIVALENCE_MARGIN
    same = {"kv_heads=8": run([5.0, 5.1, 5.2]), "kv_heads=1": run([5.01, 5.11, 5.20]), "kv_heads=2": run([5.0, 5.1, 5.2])}
    assert verdict(kv, same, {})[0] == "reproduced"
    better = {**same, "kv_heads=1": run([5.0 - 3 * m, 5.1 - 3 * m, 5.2 - 3 * m - 0.001])}
    label, lines = verdict(kv, better, {})
    assert label == "reproduced" and "better" in lines[0]  # fewer heads clearly better: no degradation
    worse = {**same, "kv_heads=1": run([5.3, 5.4, 5.5])}
    assert verdict(kv, worse, {})[0] == "not reproduced"
    noisy = {**same, "kv_heads=1": run([5.0, 5.2, 5.1])}
    assert verdict(kv, noisy, {})[0] == "inconclusive"

    lr = known["lr"]
    sweep = {v: run([5.0 + i * 0.1, 5.05 + i * 0.1, 5.1 + i * 0.1]) for i, v in enumerate(lr.variants)}
    label, lines = verdict(lr, sweep, {})
    assert label == "not reproduced" and lines[0] == "beaten by lr=0.0006, lr=0.0015"
    valley = {v: run([5.5, 5.6, 5.7]) for v in lr.variants}
    valley[lr.baseline] = run([5.0, 5.1, 5.2])
    assert verdict(lr, valley, {})[0] == "reproduced"
    valley["lr=0.0015"] = run([5.0, 5.2, 5.1])
    assert verdict(lr, valley, {})[:1] == ("inconclusive",)

    stability = known["norm_position"]
    unigram = 6.6
    groups = {v: run([5.0, 5.0, 5.1]) for v in stability.variants}
    groups["post lr=0.015"] = run([6.58, 6.57, 6.59])  # post-norm at 5x sits on the unigram plateau
    groups["post lr=0.003"] = run([math.nan, 5.0, 5.0], nan=True)  # and diverges at 1x in one seed
    label, lines = verdict(stability, groups, {}, unigram)
    assert label == "reproduced" and "pre-norm 0.015, post-norm 0.0006" in lines[0]
    groups["post lr=0.003"] = run([6.2, 6.3, 6.0])  # below the unigram loss, but by less than the margin
    assert verdict(stability, groups, {}, unigram)[0] == "reproduced"
    groups["post lr=0.015"] = run([5.0, 5.0, 5.1])
    assert verdict(stability, groups, {}, unigram)[0] == "not reproduced"
    assert verdict(stability, groups, {})[0] == "no data"

    yarn = known["yarn"]
    rows = [{"seq_len": 128, "long_context": [{"length": 256, "plain": 6.0 + s, "yarn": 5.0 + s, "windows": 4},
                                              {"length": 2048, "plain": 7.0 + s, "yarn": 6.5 + s, "windows": 4}]}
            for s in (0.0, 0.1, 0.2)]
    assert verdict(yarn, {"base": run([5.0, 5.1, 5.2])}, {"base": rows})[0] == "reproduced"
    rows[1]["long_context"][1]["yarn"] = 9.0
    assert verdict(yarn, {"base": run([5.0, 5.1, 5.2])}, {"base": rows})[0] == "inconclusive"


def curve_run(seed: int, points: list[tuple[int, float]], final: float, periodic: float | None) -> dict:
    """A run whose periodic evaluations are `points` (tokens, loss) and whose final evaluation of the whole split
    gives `final` (and `periodic` on the periodic rows)."""
    val = [{"tokens_seen": t, "val_loss": loss, "val_tokens": 100} for t, loss in points]
    last = {"tokens_seen": 1000, "val_loss": final, "val_tokens": 5000}
    if periodic is not None:
        last["val_loss_periodic"] = periodic
    return {"seed": seed, "val": [*val, last], "train": [], "final_val": final,
            "summary": {"tokens_seen": 1000, "cpu_seconds": 100.0}}


def test_time_to_target_follows_the_stated_rule() -> None:
    from tlm.studies.report import target_table
    from tlm.studies.verdicts import curve, tokens_to_target

    study = studies(load_config(REPO / "configs" / "ablations" / "cpu.yaml"))["optimizer"]
    adamw = [curve_run(s, [(0, 9.0), (500, 6.0)], 4.73 + s / 100, 5.0 + s / 100) for s in range(3)]
    # the final record's own loss (another measure: the whole split) is not a point of the curve
    assert curve(adamw[0]) == [(0, 9.0), (500, 6.0), (1000, 5.0)]
    assert curve(curve_run(0, [(0, 9.0)], 4.7, None)) == [(0, 9.0)]
    fast = [curve_run(s, [(0, 9.0), (500, 4.9)], 4.6 + s / 100, 4.8) for s in range(3)]
    assert tokens_to_target(fast[0], 5.0) == pytest.approx(0 + 500 * (9.0 - 5.0) / (9.0 - 4.9))
    assert tokens_to_target(fast[0], 4.0) is None
    groups = {v: [curve_run(s, [(0, 9.0), (500, 7.0)], 5.5, 5.6) for s in range(3)] for v in study.variants}
    groups["adamw"], groups["muon lr=0.02"] = adamw, fast
    label, lines = verdict(study, groups, {})
    assert label == "reproduced" and "muon lr=0.02" in lines[0] and "seed 0: 0.000" in lines[1]
    table = "\n".join(target_table(study, groups))
    assert "| muon lr=0.02 | 3 of 3 | 0.000M |" in table and "| adamw | 3 of 3 | 0.001M | 1.00 | 100 |" in table
    # the best rate never reaches AdamW's final loss in one seed: not reproduced
    groups["muon lr=0.02"] = fast[:2] + [curve_run(2, [(0, 9.0), (500, 6.0)], 4.5, 5.5)]
    assert verdict(study, groups, {})[0] == "not reproduced"
    # reaches the target sooner but does not end lower beyond the noise: inconclusive
    groups["muon lr=0.02"] = [curve_run(s, [(0, 9.0), (500, 4.9)], [4.7, 4.8, 4.71][s], 4.8) for s in range(3)]
    assert verdict(study, groups, {})[0] == "inconclusive"
    # baseline runs from before val_loss_periodic was logged: no target on the curve's measure
    groups["adamw"] = [curve_run(s, [(0, 9.0)], 4.73, None) for s in range(3)]
    assert verdict(study, groups, {})[0] == "no data"


def test_a_run_trained_twice_counts_each_step_once(tmp_path: Path) -> None:
    """metrics.jsonl of an interrupted run trained again holds its first steps twice: the last record wins."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 0, "val_loss": 9.0}, {"step": 10, "loss": 8.0}, {"step": 0, "val_loss": 9.1},
             {"step": 10, "loss": 7.5}, {"step": 20, "loss": 7.0}, {"step": 20, "val_loss": 6.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "summary.json").write_text(json.dumps({"complete": True, "steps": 20, "total_steps": 20}))
    loaded = load_run(run)
    assert [(r["step"], r["loss"]) for r in loaded["train"]] == [(10, 7.5), (20, 7.0)]
    assert [(r["step"], r["val_loss"]) for r in loaded["val"]] == [(0, 9.1), (20, 6.9)]
    assert loaded["final_val"] == 6.9


def test_the_committed_report_regenerates_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The files committed beside docs/ablations/cpu/report.md (every run's metrics, summary and analysis, and
    unigram.json) reproduce it to the byte: no training, no model needed."""
    import re

    committed = REPO / "docs" / "ablations" / "cpu"
    seeds = int(re.search(r"up to (\d+) seeds", (committed / "report.md").read_text()).group(1))
    assert len(list((committed / "runs").glob("*/metrics.jsonl"))) >= 40
    main(["ablate", "report", "--scale", "cpu", "--seeds", str(seeds), "--out", str(committed), "--report", str(tmp_path)])
    capsys.readouterr()
    assert (tmp_path / "report.md").read_text() == (committed / "report.md").read_text()


def test_the_post_norm_comparison_regenerates_exactly(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("postln_reference", REPO / "scripts" / "postln_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(list(module.CURVES.glob("*.jsonl"))) == len(module.GRID)
    path = module.report(tmp_path)
    assert path.read_text() == (REPO / "docs" / "ablations" / "cpu" / "postln.md").read_text()
