"""tlm installed as a package, not run from a clone: a wheel built from this tree, installed into a fresh virtual
environment, trains `--config debug` from an empty folder (the recipes, DeepSpeed's JSON and the bundled corpus
travel inside it; `tlm train` used to look for configs/ beside the package)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment_trains_a_named_recipe(tmp_path: Path) -> None:
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    # built from a copy: setuptools writes build/ and tlm.egg-info/ into the tree it builds, and this checkout must
    # stay as it was
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", ".pytest_cache",
                                                                "__pycache__", "runs"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # tlm's own files from the wheel alone; its dependencies from this environment (a .pth line adds the folder
    # without running this environment's .pth files, so the editable tlm of this checkout stays out)
    wheel = next(wheels.glob("tlm-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(purelib), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "empty"
    work.mkdir()
    code = ("import tlm, sys; print(tlm.__file__); from tlm.cli import main; main(sys.argv[1:])")
    corpus = purelib / "data_pipeline" / "corpora" / "tinyshakespeare.txt.xz"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    result = subprocess.run([str(python), "-c", code, "train", "--config", "debug", f"--data.source={corpus}",
                             "--data.vocab_size=300", "--data.sample_by=paragraph", "--data.val_fraction=0.1",
                             "--train.max_steps=2",
                             "--logging.wandb=disabled", "--logging.sample_prompt=null"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith(str(purelib))  # the installed tlm, not this checkout
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["steps"] == 2 and (work / "runs" / "debug" / "summary.json").is_file()
