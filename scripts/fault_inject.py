"""kill -9 at random points of a 2-process DeepSpeed ZeRO-2 run on CPU, then `--resume auto` to the end:
the final fp32 weights must be identical to an uninterrupted run's. Prints a table, writes JSON.

    python scripts/fault_inject.py --trials 20 --out fault-table.json        # random kill times
    python scripts/fault_inject.py --trials 0                                 # only the targeted faults

Each trial starts the job (torchrun, 2 ranks, gloo), kills one rank or every rank with SIGKILL at a random
moment (start-up, a step, a checkpoint write: wherever it lands), or at a chosen point through $TLM_FAULT
(`kill_in_save@STEP`: between the backend's files and the COMPLETE marker), then reruns the same command,
as many times as needed, until the run is complete. The tests import `Job` and `targeted` from here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import fire

from tlm.training.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
STEPS = 12



def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class Job:
    """One training command (2 ranks under torchrun) on a run folder; start it again to resume."""

    def __init__(self, prepared: Path, run_dir: Path, steps: int = STEPS, processes: int = 2, **overrides) -> None:
        self.run_dir = run_dir
        self.processes = processes
        settings = {"config": str(REPO / "configs" / "debug.yaml"), "data.prepared": str(prepared),
                    "train.backend": "deepspeed", "train.zero_stage": 2, "train.max_steps": steps,
                    "checkpoint.every": 2, "checkpoint.keep_last": 2, "eval.every": 0, "logging.wandb": "disabled",
                    "logging.sample_prompt": None, "logging.run_dir": str(run_dir), **overrides}
        self.args = [f"--{k}={v}" for k, v in settings.items()]

    def start(self, fault: str = "") -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TLM_FAULT": fault, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.processes),
                   "--master_port", str(free_port()), "-m", "tlm", "train", *self.args]
        self.log = open(self.run_dir.parent / f"{self.run_dir.name}.log", "a")
        return subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, fault: str = "", timeout: float = 600) -> int:
        proc = self.start(fault)
        try:
            return proc.wait(timeout)
        finally:
            _kill_group(proc)

    def kill_at(self, step: int, delay: float, who: str, timeout: float = 600) -> str:
        """Start; once metrics.jsonl shows `step` (0: right away), wait `delay` seconds, then SIGKILL one rank
        (`one`) or every process (`all`). Returns what happened."""
        proc = self.start()
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.time() + timeout
        try:
            while step > 0 and proc.poll() is None and time.time() < deadline:
                if metrics.is_file() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
                    break
                time.sleep(0.05)
            time.sleep(delay)
            if proc.poll() is not None:
                return "finished before the kill"
            ranks = _children(proc.pid)
            if who == "all" or not ranks:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(random.choice(ranks), signal.SIGKILL)
            proc.wait(timeout)
        finally:
            _kill_group(proc)
        return f"SIGKILL {who} {delay:.2f} s after step {step}" if step else f"SIGKILL {who} {delay:.2f} s after start"

    def finish(self, attempts: int = 3) -> int:
        """Rerun (--resume auto, the default) until the run is complete; returns how many reruns it took."""
        for attempt in range(1, attempts + 1):
            if self.run() == 0 and self.summary().get("complete"):
                return attempt
        raise RuntimeError(f"{self.run_dir} did not complete in {attempts} reruns; see {self.log.name}")

    def summary(self) -> dict:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(Path(self.summary()["model"]) / "model.safetensors"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def identical(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def prepare_data(work: Path) -> Path:
    """A small prepared dataset: the bundled Shakespeare as one document per speech, a 1000-token tokenizer."""
    import lzma

    from data_pipeline import TINYSHAKESPEARE
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.documents import DocumentReader
    from data_pipeline.sources import resolve_sources
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    corpus = work / "speeches.jsonl"
    if not corpus.is_file():
        speeches = [p for p in lzma.open(TINYSHAKESPEARE, "rt", encoding="utf-8").read().split("\n\n") if p.strip()]
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in speeches), encoding="utf-8")
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        tok = train_tokenizer(DocumentReader(resolve_sources(str(corpus))), vocab_size=1000, show_progress=False)
        save_tokenizer(tok, tokenizer)
    out = work / "data"
    if not (out / "manifest.json").is_file():
        prepare(PrepareConfig(data=[str(corpus)], tokenizer=str(tokenizer), out=str(out), seq_len=64, val=0.05),
                progress=False)
    return out


def targeted() -> list[tuple[str, str]]:
    """The faults placed on purpose: (name, $TLM_FAULT)."""
    return [("rank 0 killed while writing checkpoint 4", "kill_in_save@4:rank0"),
            ("rank 1 killed while writing checkpoint 6", "kill_in_save@6:rank1"),
            ("both ranks killed while writing checkpoint 8", "kill_in_save@8"),
            ("both ranks killed as step 5 begins", "kill@5")]


def main(trials: int = 10, seed: int = 0, work: str | None = None, out: str | None = None) -> list[dict]:
    """Run the targeted faults and `trials` random kills; print the table; write JSON to `out`.

    `work` holds the runs (hundreds of MB of checkpoints); by default a new temporary folder, never the checkout.
    """
    import tempfile

    rng = random.Random(seed)
    root = Path(work).resolve() if work else Path(tempfile.mkdtemp(prefix="tlm-fault-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"runs in {root}", flush=True)
    prepared = prepare_data(root)
    reference = Job(prepared, root / "reference")
    if not reference.summary().get("complete"):
        assert reference.run() == 0, f"the uninterrupted run failed; see {reference.log.name}"
    expected = reference.weights()
    rows = []
    cases = [(name, fault, None, None) for name, fault in targeted()]
    # a random step (0 = during start-up), then a random delay: lands in a step, an eval or a checkpoint write
    cases += [(f"random kill {i + 1}", "", (rng.randint(0, STEPS - 1), rng.uniform(0, 1.5)), rng.choice(["one", "all"]))
              for i in range(trials)]
    for i, (name, fault, at, who) in enumerate(cases):
        job = Job(prepared, root / f"trial-{i:03d}")
        if job.run_dir.exists():
            import shutil

            shutil.rmtree(job.run_dir)
        what = f"TLM_FAULT={fault} (exit {job.run(fault)})" if fault else job.kill_at(*at, who)
        checkpoints = sorted(p.name for p in (job.run_dir / "checkpoints").glob("step-*")) \
            if (job.run_dir / "checkpoints").is_dir() else []
        reruns = job.finish()
        same = identical(expected, job.weights())
        rows.append({"case": name, "fault": what, "left_behind": checkpoints, "reruns": reruns, "identical": same})
        print(f"{name:46s} | {what:40s} | left {','.join(c[-2:] for c in checkpoints) or '-':14s} | "
              f"reruns {reruns} | {'identical' if same else 'DIFFERENT'}", flush=True)
    print(f"{sum(r['identical'] for r in rows)}/{len(rows)} interrupted runs ended with the uninterrupted run's weights")
    if out:
        Path(out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
