"""A run folder's history on a bad day: rollbacks, reruns, a new run started over an old one, step folders
copied in from elsewhere. The folder's history is a lineage (tlm.checkpointing.lineage): `latest` is what a
plain rerun follows, a rollback starts a branch and moves what it leaves behind to checkpoints/abandoned/,
pruning counts along the current line, and a refusal is one line that changes nothing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from hostile import cli, edit_json, refused, snapshot, train_args
from tlm.checkpointing.checkpoints import manifest
from tlm.checkpointing.layout import COMPLETE, read_latest, verify
from tlm.checkpointing.lineage import find_resume
from tlm.checkpointing.lineage import plan_start
from tlm.training.config import load_config
from tlm.training.session import rerun_hint


@pytest.fixture(scope="module")
def template(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture()
def run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def said(args: list[str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> tuple[int, str, str]:
    """`tlm ARGS` here: (exit status, stdout, stderr with the log lines of this call)."""
    caplog.clear()
    status, out, err = cli(args, capsys)
    return status, out, err + caplog.text


def state(path: Path) -> dict:
    return json.loads((path / "trainer.json").read_text())


def steps_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step-*"))


def sessions(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["session"] for x in lines if "session" in x]


ROLLBACK = {"train.stop_at": 6, "optim.lr": 2e-3, "checkpoint.allow_change": "optim.lr"}


def test_a_rollback_starts_a_branch_that_reruns_follow_and_pruning_counts_along(
        run: Path, prepared: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    root = run / "checkpoints"
    old_eight = snapshot(root / "step-00000008")
    caplog.set_level(logging.INFO, logger="tlm")
    status, _, err = said(train_args(prepared, run, **{"checkpoint.resume": root / "step-00000004", **ROLLBACK}),
                          capsys, caplog)
    assert status == 0, err
    assert "moved step-00000008" in err and "nothing was deleted" in err
    assert steps_in(root) == ["step-00000004", "step-00000006"]  # the rollback point is kept, the old step 8 is not
    assert read_latest(run) == root / "step-00000006"  # what a plain rerun follows
    moved = root / "abandoned" / "1" / "step-00000008"
    assert snapshot(moved) == old_eight and verify(moved) is None  # whole, still loadable
    assert json.loads((run / "summary.json").read_text())["checkpoint"] == str(root / "step-00000006")
    assert "--checkpoint.resume=auto" in err  # the stop_at line names a command that continues
    four, six = state(root / "step-00000004")["lineage"], state(root / "step-00000006")["lineage"]
    assert six["parent"] == four["id"] and six["parent_name"] == "step-00000004" and six["run_id"] == four["run_id"]

    status, _, err = said(train_args(prepared, run, **{"optim.lr": 2e-3}), capsys, caplog)  # a plain rerun
    assert status == 0, err
    assert "nothing to train" not in err and "resumed from" in err and "step-00000006" in err
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert steps_in(root) == ["step-00000006", "step-00000008"]  # keep_last 2, counted along the branch
    assert state(root / "step-00000008")["lineage"]["parent"] == six["id"]
    assert snapshot(moved) == old_eight  # pruning never touches abandoned/
    assert [(s["resumed_from"], s["abandoned"]) for s in sessions(run)] == [
        (None, []), ("step-00000004", ["step-00000008"]), ("step-00000006", [])]

    # switching back: resuming the abandoned step 8 brings its line back and moves the new branch aside
    status, _, err = said(train_args(prepared, run, **{"checkpoint.resume": moved}), capsys, caplog)
    assert status == 0, err
    assert "already at step 8" in err
    assert steps_in(root) == ["step-00000008"] and read_latest(run) == root / "step-00000008"
    assert snapshot(root / "step-00000008") == old_eight
    assert steps_in(root / "abandoned" / "2") == ["step-00000006", "step-00000008"]
    assert not (root / "abandoned" / "1").exists()  # emptied by the switch


def test_a_rollback_with_keep_last_1_keeps_its_new_checkpoint(run: Path, prepared: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    root = run / "checkpoints"
    args = train_args(prepared, run, **{"checkpoint.resume": root / "step-00000004", "checkpoint.keep_last": 1,
                                        **ROLLBACK})
    status, _, err = cli(args, capsys)
    assert status == 0, err
    assert steps_in(root) == ["step-00000006"] and read_latest(run) == root / "step-00000006"
    summary = json.loads((run / "summary.json").read_text())
    assert Path(summary["checkpoint"]).is_dir() and verify(Path(summary["checkpoint"])) is None
    assert steps_in(root / "abandoned" / "1") == ["step-00000008"]


def test_a_refused_rollback_moves_nothing(run: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    root = run / "checkpoints"
    before = snapshot(run)
    refused(train_args(prepared, run, **{"checkpoint.resume": root / "step-00000004", "optim.lr": 2e-3}), capsys,
            "cannot resume", "optim.lr: 0.001 -> 0.002", "--checkpoint.allow_change=optim.lr")
    assert snapshot(run) == before


def test_a_kill_between_latest_and_the_move_is_tidied_by_the_next_run(run: Path) -> None:
    root = run / "checkpoints"
    (root / "latest").write_text("step-00000004\n")  # a rollback killed after moving `latest`, before the move
    start = plan_start(run, "auto")
    assert start.resume == root / "step-00000004" and start.abandon == [root / "step-00000008"]
    start.apply()
    assert steps_in(root) == ["step-00000004"] and steps_in(root / "abandoned" / "1") == ["step-00000008"]
    assert find_resume(run, "auto") == root / "step-00000004"


def test_resume_none_in_a_used_folder_is_refused_and_overwrite_starts_afresh(
        run: Path, prepared: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tlm")
    before = snapshot(run)
    refused(train_args(prepared, run, **{"checkpoint.resume": "none"}), capsys,
            f"run folder '{run}' already holds a run (checkpoints step-00000004..step-00000008, metrics.jsonl, "
            "summary.json)", "--logging.run_dir", "--checkpoint.overwrite=true")
    assert snapshot(run) == before
    old_run = state(run / "checkpoints" / "step-00000008")["lineage"]["run_id"]

    args = train_args(prepared, run, **{"checkpoint.resume": "none", "checkpoint.overwrite": "true",
                                        "train.stop_at": 2})
    status, _, err = said(args, capsys, caplog)
    assert status == 0, err
    root = run / "checkpoints"
    assert steps_in(root) == ["step-00000002"] and state(root / "step-00000002")["lineage"]["run_id"] != old_run
    assert [s["resumed_from"] for s in sessions(run)] == [None]  # the old run's metrics went with it
    assert ("rerun with --checkpoint.resume=auto in place of --checkpoint.resume=none and a later --train.stop_at "
            "than 2 (or none) to resume (the same command would start over)") in err
    # what the message says resumes (the same command would start over)
    status, _, err = said(train_args(prepared, run, **{"checkpoint.resume": "auto"}), capsys, caplog)
    assert status == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 8 and "resumed from" in err
    assert [s["resumed_from"] for s in sessions(run)] == [None, "step-00000002"]


def test_another_folders_checkpoint_into_a_used_folder_is_refused(run: Path, template: Path, prepared: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    before = snapshot(run)
    refused(train_args(prepared, run, **{"checkpoint.resume": template / "checkpoints" / "step-00000004"}), capsys,
            "already holds a run", "a checkpoint of another folder", "--checkpoint.overwrite=true")
    assert snapshot(run) == before


def test_a_step_folder_copied_in_under_another_name_is_never_trusted(
        run: Path, prepared: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    root = run / "checkpoints"
    shutil.copytree(root / "step-00000004", root / "step-00000099")
    copied = snapshot(root / "step-00000099")
    caplog.set_level(logging.INFO, logger="tlm")
    status, _, err = said(train_args(prepared, run), capsys, caplog)  # a plain rerun follows `latest`, not the highest name
    assert status == 0, err
    assert "already at step 8" in err and "ignoring" in err and "says step 4, its name step 99" in err
    assert snapshot(root / "step-00000099") == copied  # never pruned either
    refused(train_args(prepared, run, **{"checkpoint.resume": root / "step-00000099"}), capsys,
            "step-00000099' was not written there by this run", "its trainer.json says step 4, its name step 99",
            "move it out of the run folder")
    (root / "latest").unlink()  # without the pointer the highest name comes first: refused, not trusted
    before = snapshot(run)
    refused(train_args(prepared, run), capsys, "step-00000099' was not written there by this run")
    assert snapshot(run) == before


def test_another_runs_checkpoint_copied_in_is_refused(run: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    root = run / "checkpoints"
    stranger = root / "step-00000012"
    shutil.copytree(root / "step-00000004", stranger)

    def other_run(data: dict) -> None:
        data["step"], data["lineage"]["run_id"] = 12, "0123456789abcdef"

    edit_json(stranger / "trainer.json", other_run)
    (stranger / COMPLETE).write_text(json.dumps({"files": manifest(stranger)}))  # sealed: sound by itself
    assert verify(stranger) is None
    refused(train_args(prepared, run, **{"checkpoint.resume": stranger}), capsys,
            "belongs to run 0123456789abcdef, this folder's run is")
    assert find_resume(run, "auto") == root / "step-00000008"  # `latest` is followed; the stranger is ignored


def test_the_hint_to_resume_names_a_command_that_resumes() -> None:
    debug = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"
    assert rerun_hint(load_config(debug)) == "rerun the same command to resume"
    hint = rerun_hint(load_config(debug, {"checkpoint.resume": "none"}))
    assert "--checkpoint.resume=auto" in hint and "would start over" in hint
    hint = rerun_hint(load_config(debug, {"checkpoint.resume": "RUN/checkpoints/step-00000004"}))
    assert "--checkpoint.resume=auto" in hint and "go back to RUN/checkpoints/step-00000004 again" in hint


@pytest.mark.parametrize("given", ["RUN", "RUN/checkpoints", "RUN/checkpoints/latest", "RUN/checkpoints/step-00000008",
                                   "RUN/checkpoints/step-00000008/model"])
def test_a_run_folder_a_step_folder_or_latest_is_a_model_folder(template: Path, tmp_path: Path, given: str,
                                                                 capsys: pytest.CaptureFixture,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """What a nanoGPT or litgpt user types: the run folder means its newest model (it used to be refused)."""
    from tlm.checkpointing.lineage import resolve_model_dir

    path = Path(given.replace("RUN", str(template)))
    expected = template / "checkpoints" / "step-00000008" / "model"
    caplog.set_level(logging.INFO, logger="tlm")
    assert resolve_model_dir(path) == expected
    if path != expected:
        assert f"using {expected}" in caplog.text  # named in one line
    status, out, err = cli(["generate", "--checkpoint", path, "--prompt_ids", "[[1, 2, 3]]", "--max_new_tokens", 2],
                           capsys)
    assert status == 0 and json.loads(out.splitlines()[-1])["new_tokens"], err


def test_a_run_folder_without_a_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    refused(["eval", "--checkpoint", tmp_path / "run", "--data", tmp_path], capsys, "holds no complete checkpoint yet")
    refused(["export", "--checkpoint", tmp_path, "--out", tmp_path / "hf"], capsys, "is not a model folder")
