"""Hostile input: folders tlm writes whole (`tlm export`, `tlm init`, the model folder of a checkpoint, DeepSpeed's
universal conversion) written over an earlier one, by two processes at once, or killed half-way. Each appears
whole or not at all: it is built beside its final name and swapped in under a lock (`tlm_base.folders.replace_folder`), so
no stale file survives, two writers never mix, and a kill leaves the earlier folder whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hostile import child, cli, refused, snapshot
from tlm_base import fileio, folders
from tlm_base.errors import CheckpointError
from tlm_base.folders import replace_folder
from tlm.cli import main
from tlm.training.backends import universal

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path) -> dict[str, Path]:
    """Two model folders: one with the 1000-token tokenizer, one without a tokenizer and a vocabulary of 300."""
    root = tmp_path_factory.mktemp("outputs")
    main(["init", "--out", str(root / "with"), "--preset", "debug", "--tokenizer", str(data_tokenizer)])
    main(["init", "--out", str(root / "without"), "--preset", "debug", "--vocab_size=300", "--seed", "1"])
    return {"with": root / "with", "without": root / "without"}


def clean_export(model: Path, folder: Path) -> dict[str, str]:
    """What a clean export of `model` holds."""
    main(["export", "--checkpoint", str(model), "--out", str(folder)])
    return snapshot(folder)


def same_model(a: Path, b: Path) -> bool:
    """Two model folders hold the same files and tensors (safetensors writes its metadata in no fixed order)."""
    files = snapshot(a), snapshot(b)
    weights = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return ({k: v for k, v in files[0].items() if k != "model.safetensors"}
            == {k: v for k, v in files[1].items() if k != "model.safetensors"} and files[0].keys() == files[1].keys()
            and weights[0].keys() == weights[1].keys()
            and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- tlm export / tlm init over an earlier folder ------------------------------------------------------------

def test_an_export_without_a_tokenizer_over_one_with_keeps_no_tokenizer(tmp_path: Path, models: dict[str, Path],
                                                                        capsys: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    expected = clean_export(models["without"], tmp_path / "clean")
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(models["with"]), "--out", str(out)])
    assert TOKENIZER_FILES <= set(os.listdir(out))
    code, stdout, err = cli(["export", "--checkpoint", models["without"], "--out", out], capsys)
    assert code == 0, err
    assert snapshot(out) == expected and not TOKENIZER_FILES & set(os.listdir(out))  # used to keep the old ones
    assert json.loads(stdout.splitlines()[-1])["files"] == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []
    with pytest.raises((OSError, ValueError)):  # no tokenizer of 1000 tokens for a model of 300
        transformers.AutoTokenizer.from_pretrained(out)
    assert transformers.AutoConfig.from_pretrained(out).vocab_size == 300


def test_init_overwrite_leaves_only_the_new_files(tmp_path: Path, data_tokenizer: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    clean, folder = tmp_path / "clean", tmp_path / "m"
    main(["init", "--out", str(clean), "--preset", "debug"])
    main(["init", "--out", str(folder), "--preset", "debug", "--tokenizer", str(data_tokenizer)])
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"x")
    before = snapshot(folder)
    refused(["init", "--out", folder, "--preset", "debug"], capsys,
            f"'{folder}' already holds a model; pass --overwrite")
    assert snapshot(folder) == before
    code, _, err = cli(["init", "--out", folder, "--preset", "debug", "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["model.safetensors", "tlm_config.json"]  # no tokenizer, notes or sub/
    assert same_model(folder, clean) and leftovers(tmp_path) == []


def test_init_or_export_into_a_folder_of_other_files_is_refused(tmp_path: Path, models: dict[str, Path],
                                                               data_tokenizer: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / ".bashrc").write_text("x")
    (folder / "thesis.tex").write_text("y")
    before = snapshot(folder)
    refused(["init", "--out", folder, "--preset", "debug"], capsys,
            f"'{folder}' is not empty and not a model folder (it holds .bashrc, thesis.tex)", "--overwrite")
    refused(["export", "--checkpoint", models["with"], "--out", folder], capsys,
            f"'{folder}' holds files an export does not write (.bashrc, thesis.tex)", "--overwrite")
    assert snapshot(folder) == before and leftovers(tmp_path) == []
    # a tokenizer folder is a tokenizer, not a leftover: replaced only when it is the model's own --tokenizer
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in TOKENIZER_FILES:
        (tok / name).write_bytes((data_tokenizer / name).read_bytes())
    refused(["init", "--out", tok, "--preset", "debug"], capsys, "not a model folder (it holds special_tokens_map.json")
    code, _, err = cli(["init", "--out", tok, "--preset", "debug", "--tokenizer", tok], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tok)) == sorted({"model.safetensors", "tlm_config.json", *TOKENIZER_FILES})
    assert (tok / "tokenizer.json").read_bytes() == (data_tokenizer / "tokenizer.json").read_bytes()


# --- two writers, a kill --------------------------------------------------------------------------------------

def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 120) -> str:
    """Read the child's stderr until a line holds `needle`."""
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    proc.kill()
    raise AssertionError(f"no {needle!r} from the child (exit {proc.poll()}):\n{''.join(seen)[-3000:]}")


def test_a_second_export_into_a_folder_being_exported_is_refused_naming_the_first(
        tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hf"
    earlier = clean_export(models["without"], out)
    first = child(["export", "--checkpoint", models["with"], "--out", out], env={"TLM_FAULT": "stall_in_export@any"})
    try:
        _wait_for(first, "fault injection: stalling the export")  # it holds the lock, half-way through
        refused(["export", "--checkpoint", models["without"], "--out", out], capsys,
                f"export folder '{out}' is in use by pid {first.pid}", "tlm export", "wait for that export to finish")
        assert snapshot(out) == earlier
    finally:
        first.kill()
        first.communicate()
    assert snapshot(out) == earlier  # killed half-way: the earlier export is whole


def test_two_exports_into_one_folder_at_once_leave_one_whole_export(tmp_path: Path, models: dict[str, Path]) -> None:
    clean = {name: clean_export(model, tmp_path / f"clean-{name}") for name, model in models.items()}
    out = tmp_path / "hf"
    procs = [child(["export", "--checkpoint", model, "--out", out]) for model in models.values()]
    results = [(proc.communicate(timeout=120)[1], proc.returncode)[::-1] for proc in procs]
    for code, err in results:
        errors = [line for line in err.splitlines() if line.startswith("tlm: error:")]
        assert (code == 0 and not errors) or (code == 2 and len(errors) == 1 and "is in use by pid" in errors[0]), err
    assert any(code == 0 for code, _ in results)
    assert snapshot(out) in clean.values()  # one export whole, never a mix of the two
    assert leftovers(tmp_path) == []


def test_a_kill_in_the_middle_of_an_export_keeps_the_previous_one(tmp_path: Path, models: dict[str, Path],
                                                                  capsys: pytest.CaptureFixture) -> None:
    expected = clean_export(models["with"], tmp_path / "clean")
    out = tmp_path / "hf"
    earlier = clean_export(models["without"], out)
    killed = child(["export", "--checkpoint", models["with"], "--out", out], env={"TLM_FAULT": "kill_in_export@any"})
    err = killed.communicate(timeout=120)[1]
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    assert snapshot(out) == earlier
    assert leftovers(tmp_path) == [".hf.lock", f".hf.tmp-{killed.pid}"]  # hidden beside it: its lock, its half
    code, _, err = cli(["export", "--checkpoint", models["with"], "--out", out], capsys)
    assert code == 0, err
    assert snapshot(out) == expected and leftovers(tmp_path) == []  # the rerun removed it


def test_the_fallback_swap_recovers_from_a_kill_between_its_renames(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem cannot exchange two folders in one step (NFS), the old folder is renamed aside first:
    a kill right then leaves it whole as .NAME.old-PID, which the next writer puts back before replacing it."""
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    target = tmp_path / "m"
    for text in ("one", "two"):
        with replace_folder(target) as tmp:
            (tmp / "f").write_text(text)
        assert os.listdir(target) == ["f"] and (target / "f").read_text() == text and leftovers(tmp_path) == []
    target.rename(tmp_path / ".m.old-999999")  # the state a kill between the two renames leaves
    with pytest.raises(RuntimeError):
        with replace_folder(target) as tmp:
            assert (target / "f").read_text() == "two"  # put back before the block runs
            raise RuntimeError("a refusal")
    assert (target / "f").read_text() == "two" and leftovers(tmp_path) == []


# --- model.safetensors of the wrong dtype ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_weights_of_an_integer_dtype_are_refused_naming_the_tensor(tmp_path: Path, models: dict[str, Path],
                                                                   dtype: torch.dtype,
                                                                   capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for file in models["without"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    weights["layers.0.mlp.up_proj.weight"] = weights["layers.0.mlp.up_proj.weight"].to(dtype)
    save_file(weights, str(folder / "model.safetensors"))
    name = str(dtype).removeprefix("torch.")
    message = f"tensor 'layers.0.mlp.up_proj.weight' has dtype {name}, not a floating point type"
    refused(["generate", "--checkpoint", folder, "--prompt_ids", "[1, 2, 3]", "--max_new_tokens", "2"], capsys, message)
    refused(["export", "--checkpoint", folder, "--out", tmp_path / "hf"], capsys, message)
    assert not (tmp_path / "hf").exists()


# --- DeepSpeed's universal conversion --------------------------------------------------------------------------

CONVERTER = """
import os, sys
out = sys.argv[sys.argv.index("--output_folder") + 1]
with open(os.environ["CALLS"], "a") as f:
    f.write(out + "\\n")
if os.environ.get("FAIL"):
    os.makedirs(os.path.join(out, "zero"))
    sys.exit(3)
os.makedirs(os.path.join(out, "zero", "embed_tokens.weight"))
open(os.path.join(out, "zero", "embed_tokens.weight", "fp32.pt"), "w").write("new")
open(os.path.join(out, "mp_rank_00_model_states.pt"), "w").write("new")
open(os.path.join(os.path.dirname(out), "latest_universal"), "w").write(os.path.basename(out))
"""

# A converter that starts a pool of workers (as ds_to_universal does), says their pids, and works for ever.
POOL_CONVERTER = """
import multiprocessing, os, sys, time
pool = multiprocessing.get_context("fork").Pool(2)
pids = [os.getpid()] + [p.pid for p in pool._pool]
with open(os.environ["PIDS"] + ".tmp", "w") as f:
    f.write(" ".join(map(str, pids)))
os.rename(os.environ["PIDS"] + ".tmp", os.environ["PIDS"])
time.sleep(600)
"""


def _stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str) -> Path:
    script = tmp_path / "converter.py"
    script.write_text(code)
    monkeypatch.setattr(universal, "UNIVERSAL_CONVERTER", [sys.executable, str(script)])
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    return script


def _backend_folder(tmp_path: Path) -> Path:
    path = tmp_path / "step-00000003" / "backend"
    (path / "deepspeed").mkdir(parents=True)
    (path / "deepspeed" / "mp_rank_00_model_states.pt").write_text("zero-2 of 2 ranks")
    return path


def test_a_half_made_universal_conversion_is_redone_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(tmp_path, monkeypatch, CONVERTER)
    path = _backend_folder(tmp_path)
    half = path / "deepspeed_universal" / "zero" / "embed_tokens.weight"  # what a kill used to leave, and reuse
    half.mkdir(parents=True)
    (half / "exp_avg.pt").write_text("half")
    (path / ".deepspeed_universal.tmp-999999" / "zero").mkdir(parents=True)  # and a kill now
    universal.convert_to_universal(path)
    target = path / "deepspeed_universal"
    assert snapshot(target).keys() == {"CONVERTED", "mp_rank_00_model_states.pt", "zero/embed_tokens.weight/fp32.pt"}
    assert json.loads((target / "CONVERTED").read_text())["exit_status"] == 0
    assert (path / "latest_universal").read_text() == "deepspeed_universal"  # not the temporary name
    assert sorted(os.listdir(path)) == ["deepspeed", "deepspeed_universal", "latest_universal"]
    universal.convert_to_universal(path)  # complete: reused, not redone
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


def test_a_failed_universal_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(tmp_path, monkeypatch, CONVERTER)
    monkeypatch.setenv("FAIL", "1")
    path = _backend_folder(tmp_path)
    with pytest.raises(CheckpointError, match="could not convert .* for a new world size \\(exit status 3") as error:
        universal.convert_to_universal(path)
    assert "\n" not in str(error.value) and "its output is in" in str(error.value)  # one line; the output kept
    assert sorted(os.listdir(path)) == ["deepspeed", "ds_to_universal.log"]  # no half-made conversion


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
def test_no_converter_process_outlives_tlm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: int) -> None:
    script = _stub(tmp_path, monkeypatch, POOL_CONVERTER)
    path, pids_file = _backend_folder(tmp_path), tmp_path / "pids"
    code = ("import sys; from pathlib import Path; import tlm.training.backends.universal as b; "
            f"b.UNIVERSAL_CONVERTER = [sys.executable, {str(script)!r}]; b.convert_to_universal(Path(sys.argv[1]))")
    env = {**os.environ, "PIDS": str(pids_file), "OMP_NUM_THREADS": "1"}
    # SIGINT as a terminal gives it: a suite started in the background of a shell without job control inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler
    tlm = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not pids_file.exists() and time.time() < deadline and tlm.poll() is None:
        time.sleep(0.1)
    assert pids_file.exists(), tlm.communicate()[1][-2000:]
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    tlm.send_signal(how)
    tlm.communicate(timeout=60)
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "converter processes outlived tlm"
    assert not (path / "deepspeed_universal").exists()
    if how == signal.SIGINT:
        assert sorted(os.listdir(path)) == ["deepspeed"]  # interrupted: its temporary folder removed too
    _stub(tmp_path, monkeypatch, CONVERTER)
    universal.convert_to_universal(path)  # the next resume converts afresh, whatever was left
    assert sorted(os.listdir(path)) == ["deepspeed", "deepspeed_universal", "latest_universal"]


@pytest.mark.parametrize("command", ["prepare", "tokenizer", "init", "export"])
def test_output_folders_that_cannot_be_one_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        command: str) -> None:
    """A file above --out, a name over 255 bytes, /proc: used to be tracebacks (FileExistsError, ENAMETOOLONG)."""
    (tmp_path / "afile").write_text("x")
    source = tmp_path / "corpus.txt"
    source.write_text("some text\n" * 50)
    model = tmp_path / "model"
    assert cli(["init", "--out", model, "--preset", "debug"], capsys)[0] == 0
    args = {"prepare": ["--data", source, "--tokenizer", tmp_path / "tok"], "init": ["--preset", "debug"],
            "tokenizer": ["--data", source, "--vocab_size", 300], "export": ["--checkpoint", model]}[command]
    what = {"prepare": "prepare output", "tokenizer": "tokenizer output", "init": "model folder",
            "export": "export folder"}[command]
    before = snapshot(tmp_path)
    refused([command, "--out", tmp_path / "afile" / "out", *args], capsys, f"{what} '{tmp_path / 'afile' / 'out'}' "
            f"cannot be created: '{tmp_path / 'afile'}' is not a directory (it is a regular file)")
    refused([command, "--out", tmp_path / ("r" * 300), *args], capsys, "name too long (300 > 255 bytes")
    refused([command, "--out", "/proc/tlm-out", *args], capsys, "is on /proc, a proc file system")
    assert snapshot(tmp_path) == before


def test_init_refuses_a_seed_torch_cannot_take(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    refused(["init", "--out", tmp_path / "m", "--preset", "debug", "--seed", 2**77], capsys, "--seed must be below 2**64")
    refused(["init", "--out", tmp_path / "m", "--preset", "debug", "--seed", -1], capsys, "--seed must be at least 0")
    assert not (tmp_path / "m").exists()


def test_an_append_only_log_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    """A prepare journal or metrics.jsonl that is a FIFO used to block the first write for good."""
    from tlm_base.errors import TLMError

    os.mkfifo(tmp_path / "journal.jsonl")
    with pytest.raises(TLMError, match="journal.jsonl is not a regular file \\(it is a FIFO\\)"):
        fileio.LineAppender(tmp_path / "journal.jsonl")
