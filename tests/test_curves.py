"""A run leaves a picture: RUN/curves.png redrawn at each evaluation, `tlm plot RUN [RUN ...]` overlaying runs into
one PNG, and the line of descent they draw (a resumed or rolled-back run shows the steps as they stand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostile import cli, refused, train_args
from tlm.training.metrics import line_of_descent

PNG = b"\x89PNG\r\n\x1a\n"


def image(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes().startswith(PNG)
    return imread(path)


def test_a_session_supersedes_the_steps_past_its_start() -> None:
    records = [{"step": 0, "session": {}}, {"step": 1, "loss": 9.0, "tokens_seen": 8},
               {"step": 2, "loss": 8.0, "tokens_seen": 16}, {"step": 2, "val_loss": 8.5, "tokens_seen": 16},
               {"step": 3, "loss": 7.0, "tokens_seen": 24},
               {"step": 2, "session": {"resumed_from": "step-00000002"}},  # a rollback to step 2
               {"step": 3, "loss": 6.5, "tokens_seen": 24}, {"step": 4, "loss": 6.0, "tokens_seen": 32}]
    assert line_of_descent(records) == [
        {"step": 1, "loss": 9.0, "tokens_seen": 8}, {"step": 2, "loss": 8.0, "val_loss": 8.5, "tokens_seen": 16},
        {"step": 3, "loss": 6.5, "tokens_seen": 24}, {"step": 4, "loss": 6.0, "tokens_seen": 32}]


def test_a_run_keeps_its_curves_and_plot_overlays_runs(tmp_path: Path, prepared: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    status, _, err = cli(train_args(prepared, first, **{"train.stop_at": 4}), capsys)
    assert status == 0, err
    halfway = (first / "curves.png").read_bytes()  # drawn at the step-4 evaluation
    assert halfway.startswith(PNG)
    status, _, err = cli(train_args(prepared, first), capsys)  # resumed to the end: redrawn
    assert status == 0, err
    assert (first / "curves.png").read_bytes() != halfway and image(first / "curves.png").shape[2] in (3, 4)
    status, _, err = cli(train_args(prepared, second, **{"batch.global_batch_size": 4, "batch.micro_batch_size": 4,
                                                          "logging.curves": "false"}), capsys)
    assert status == 0, err
    assert not (second / "curves.png").exists()

    out = tmp_path / "figures" / "both.png"
    status, stdout, err = cli(["plot", first, second / "metrics.jsonl", "--out", out], capsys)
    assert status == 0, err
    drawn = json.loads(stdout.strip().splitlines()[-1])
    assert drawn["out"] == str(out) and list(drawn["runs"]) == ["first", "second"]
    # the last logged figures of each run, as metrics.jsonl holds them (tokens: 8 steps x 8 and x 4 rows x 64)
    for name, tokens in (("first", 8 * 8 * 64), ("second", 8 * 4 * 64)):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert drawn["runs"][name] == {"steps": 8, "tokens_seen": tokens,
                                       "loss": [r for r in records if "loss" in r][-1]["loss"],
                                       "val_loss": [r for r in records if "val_loss" in r][-1]["val_loss"]}
    assert image(out).shape == image(first / "curves.png").shape
    assert sorted(p.name for p in out.parent.iterdir()) == ["both.png"]  # no temporary file left


def test_plot_refuses_in_one_line(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    refused(["plot"], capsys, "tlm plot needs at least one run folder")
    refused(["plot", tmp_path / "missing"], capsys, "missing does not exist; give a run folder")
    refused(["plot", tmp_path], capsys, "holds no metrics.jsonl; give a run folder")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "session": {}}\n')
    refused(["plot", tmp_path, "--out", tmp_path / "x.png"], capsys, "holds no logged loss yet")
    refused(["plot", tmp_path, "--out", tmp_path / "x.jpg"], capsys, "the figure is a PNG")
    refused(["plot", tmp_path, "--out", tmp_path], capsys, "is a folder; give a file name ending in .png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_figure_that_cannot_be_drawn_costs_the_run_nothing(tmp_path: Path, prepared: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import tlm.training.curves as curves

    def broken(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(curves, "draw", broken)
    with caplog.at_level("WARNING"):
        status, out, err = cli(train_args(prepared, tmp_path / "run"), capsys)
    assert status == 0, err
    assert json.loads(out.strip().splitlines()[-1])["complete"]
    assert f"could not draw {tmp_path / 'run' / 'curves.png'}: No space left on device" in caplog.text
    assert not (tmp_path / "run" / "curves.png").exists()
