"""Host time per optimizer step of every backend against a bare PyTorch loop (issue 21, "One lean step").

At 2M tokens/s one micro-step of the 26M model (32 x 512 tokens) is ~8 ms of GPU work, and the host must issue a
step in less. To expose what the host spends, the model keeps the tlm-26m preset's layers and tensors (8 layers,
the same 74 parameter tensors, tied embeddings) at negligible width: hidden 64, MLP 176, 1 x 16 tokens, fp32, one
thread. The contenders:

- `bare`: forward (the same TransformerLM, its loss sum), backward, `clip_grad_norm_`, torch AdamW (for-each, the
  same parameter groups and settings), `zero_grad`: the floor;
- `single`, `zero0` ... `zero3`, `fsdp2`: tlm's own step, `Trainer.train_step` (learning rate, micro-step, optimizer
  step, counters) on the backend `make_backend` builds (DeepSpeed and FSDP2 in a 1-process gloo group, as
  `tlm train` starts them in one process); `single-noguard` with `train.nan_policy=off`;
- `bare-ddp` and `ddp`: the same on 2 processes (1 thread each, gloo): a bare DistributedDataParallel loop and tlm's
  DDP step; `ddp` is compared with `bare-ddp`, every other contender with `bare`;
- `NAME:CHECKOUT`: contender NAME with tlm imported from another checkout (`git archive COMMIT | tar -x -C DIR`):
  before and after a change, alternated in one run; `zeroN@DIR`: ZeRO-N with DIR/zeroN.json for ds_configs/'s.

Each contender is its own process (a pair for the DDP ones), built and warmed up, then waits on its stdin; the
driver gives each in turn a block of `steps` steps, the order reversed every other round, so that all of them see
the same machine (benchmarks/alternate.py's rule, across processes). Every step is timed alone. Reported per
contender: fastest and median wall time and median CPU time of a step (the process's own, so less sensitive to other
jobs on the machine), each also as a ratio to its bare loop; the largest difference of the mean loss from the bare
loop's over every step (same seed, data and optimizer); and the load average at launch, before timing and after.
The losses of every step are in the JSON (last line; --out writes it too), to compare two contenders bit for bit.
Not measured: the data stream (batches are made before timing) and logging, checkpoints and evaluation.

    python benchmarks/host_overhead.py                                 # every contender, ~3 minutes on 2 cores
    python benchmarks/host_overhead.py --contenders='["bare","zero3"]' --rounds=15
    python benchmarks/host_overhead.py --contenders='["zero1","zero1:/tmp/before"]'   # before / after a change
    python benchmarks/host_overhead.py --profile=zero3                  # cProfile of one contender's steps
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alternate import load_average  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# name: (train-config overrides, processes); a name starting with "bare" is the plain PyTorch loop
CONTENDERS: dict[str, tuple[dict[str, Any], int]] = {
    "bare": ({}, 1),
    "single": ({"train.backend": "single"}, 1),
    "single-noguard": ({"train.backend": "single", "train.nan_policy": "off"}, 1),
    "zero0": ({"train.backend": "deepspeed", "train.zero_stage": 0}, 1),
    "zero1": ({"train.backend": "deepspeed", "train.zero_stage": 1}, 1),
    "zero2": ({"train.backend": "deepspeed", "train.zero_stage": 2}, 1),
    "zero3": ({"train.backend": "deepspeed", "train.zero_stage": 3}, 1),
    "fsdp2": ({"train.backend": "fsdp2"}, 1),
    "bare-ddp": ({}, 2),
    "ddp": ({"train.backend": "ddp"}, 2),
}
# the tlm-26m model's layers and tensors at negligible width, one micro-batch of 1 x 16 tokens per rank
BASE = {"model.preset": "tlm-26m", "model.hidden_size": 64, "model.intermediate_size": 176, "data.seq_len": 16,
        "batch.micro_batch_size": 1, "train.precision": "fp32", "train.device": "cpu", "schedule.kind": "constant",
        "schedule.warmup_steps": 0, "logging.progress": False}
BATCHES = 16  # distinct batches per rank, cycled


class Contender(NamedTuple):
    overrides: dict[str, Any]
    processes: int
    ds_dir: str | None
    """A folder whose zero{stage}.json replaces ds_configs/'s."""
    code: str | None
    """A checkout whose tlm the contender imports instead of this one's (e.g. `git archive` of an earlier commit)."""


def spec(name: str) -> Contender:
    """A contender by name: one of CONTENDERS, NAME@DIR (DeepSpeed's zero{stage}.json from DIR) or NAME:CHECKOUT (tlm
    imported from CHECKOUT: the same step before a change, alternated with it)."""
    rest, _, code = name.partition(":")
    base, _, ds_dir = rest.partition("@")
    if base not in CONTENDERS or (ds_dir and not base.startswith("zero")) or base.startswith("bare") and code:
        raise SystemExit(f"unknown contender {name}; known: {', '.join(CONTENDERS)}, zeroN@DIR and NAME:CHECKOUT")
    return Contender(*CONTENDERS[base], ds_dir or None, code or None)


def reference(name: str) -> str:
    return "bare-ddp" if spec(name).processes == 2 else "bare"


# --- one contender (a worker process, or in-process for --profile) ----------------------------------------------

def build(name: str):
    """The contender's step function (returns the step's detached loss sum) and this process's rank."""
    import torch

    from tlm.model.transformer import TransformerLM
    from tlm.training.config import load_config
    from tlm.training.optim import param_groups

    torch.set_num_threads(1)
    overrides, world, ds_dir, _ = spec(name)
    fused = bool(os.environ.get("HOST_OVERHEAD_FUSED"))
    config = load_config(None, {**BASE, **overrides, "train.fused_adamw": fused})
    rank = int(os.environ.get("RANK", "0"))
    seq, micro = config.data.seq_len, config.batch.micro_batch_size
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, config.model.vocab_size, (BATCHES, world, micro, seq + 1), generator=generator)
    batches = [{"input_ids": ids[i, rank, :, :-1], "labels": ids[i, rank, :, 1:]} for i in range(BATCHES)]
    scale = world / (world * micro * seq)  # tlm's one normaliser: world size / the step's target tokens
    torch.manual_seed(config.train.seed)
    model = TransformerLM(config.model)
    if name.startswith("bare"):
        import torch.distributed as dist

        module = model
        if world > 1:
            dist.init_process_group("gloo")
            model = torch.nn.parallel.DistributedDataParallel(module)
        optim = config.optim
        optimizer = torch.optim.AdamW(param_groups(module, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      foreach=not fused, fused=fused)
        params = [p for p in module.parameters()]
        count = [0]

        def step():
            batch = batches[count[0] % BATCHES]
            count[0] += 1
            loss = model(batch["input_ids"], labels=batch["labels"])
            (loss * scale).backward()
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step, rank
    if ds_dir:
        import tlm.training.backends.zero as zero

        zero.DS_CONFIG_DIR = Path(ds_dir)
    if overrides.get("train.backend") == "deepspeed" and not os.environ.get("HOST_OVERHEAD_NUMACTL"):
        # DeepSpeed's CPU accelerator runs `numactl --hardware` in a subprocess at every device_count(), which ZeRO-3
        # calls every step (__avg_scatter_grads); CUDA's is a cached call. Cached here too, so that the figure is the
        # host cost on a GPU machine (--numactl keeps the subprocess).
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        devices = accelerator.device_count()
        accelerator.device_count = lambda: devices
    trainer = bare_trainer(config, model, batches)

    def step():
        return trainer.train_step()[0]

    return step, rank


def bare_trainer(config, model, batches):
    """A Trainer with only what `train_step` uses (no run folder, data set, stream thread or logger): the backend
    `make_backend` builds and the prepared batches in a cycle."""
    import itertools
    from types import SimpleNamespace

    from tlm.training.backends import make_backend
    from tlm.training.distributed import init_distributed
    from tlm.training.session import Progress
    from tlm.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.config = config
    trainer.info = info = init_distributed(config)
    trainer.shape = config.batch_shape(info.world_size)
    trainer.backend = make_backend(model, config, info, trainer.shape)
    trainer.stream = itertools.cycle(batches)
    trainer.data = SimpleNamespace(packed=True)
    trainer.progress, trainer.faults = Progress(), {}
    trainer.total_steps, trainer.trained_tokens, trainer.consecutive_skips = 10**9, 0, 0
    return trainer


def run_worker(name: str, warmup: int) -> None:
    """Build, warm up, say "ready"; then per line "STEPS" on stdin run that many steps and answer their times."""
    protocol = os.fdopen(os.dup(1), "w")  # the driver's line protocol; whatever else prints (DeepSpeed) goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch.distributed as dist

    step, rank = build(name)
    losses = [step() for _ in range(warmup)]
    print("ready", file=protocol, flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # both ranks start the block together
        times = []
        for _ in range(int(line)):
            start, cpu = time.perf_counter(), time.process_time()
            losses.append(step())
            times.append((time.perf_counter() - start, time.process_time() - cpu))
        print(json.dumps(times), file=protocol, flush=True)
    tokens = BASE["batch.micro_batch_size"] * BASE["data.seq_len"]  # this rank's, per step
    print(json.dumps([float(x) / tokens for x in losses]), file=protocol, flush=True)  # its mean loss per token
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the driver -------------------------------------------------------------------------------------------------

def start(name: str, warmup: int) -> list[subprocess.Popen]:
    from tlm.training.distributed import free_port

    world, code = spec(name).processes, spec(name).code
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    if code:
        env["PYTHONPATH"] = str(Path(code).resolve())
    if world > 1:
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)})
    command = [sys.executable, __file__, f"--worker={name}", f"--warmup={warmup}"]
    return [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(world)]


def answer(procs: list[subprocess.Popen], name: str) -> Any:
    """Rank 0's next line (the others' are read and dropped)."""
    lines = [p.stdout.readline() for p in procs]
    if not all(lines):
        raise SystemExit(f"contender {name} died (run it with --profile={name} to see why)")
    return lines[0].strip()


def drive(names: list[str], rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    launch = load_average()
    procs = {name: start(name, warmup) for name in names}
    for name, group in procs.items():
        assert answer(group, name) == "ready"
    before = load_average()
    times: dict[str, list[list[float]]] = {name: [] for name in names}  # [wall, CPU] seconds per step
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else list(reversed(names)):
            for p in procs[name]:
                p.stdin.write(f"{steps}\n")
                p.stdin.flush()
            times[name] += json.loads(answer(procs[name], name))
    after = load_average()
    losses = {}
    for name, group in procs.items():
        for p in group:
            p.stdin.write("stop\n")
            p.stdin.flush()
        losses[name] = json.loads(answer(group, name))
        for p in group:
            p.wait()
    return {"times": times, "losses": losses, "load_average": {"launch": launch, "before": before, "after": after}}


def run_profile(name: str, steps: int, warmup: int, top: int) -> None:
    """cProfile of `steps` steps of one 1-process contender after warmup: the top functions by own time."""
    import cProfile
    import pstats

    if spec(name).processes > 1:
        raise SystemExit("--profile takes a 1-process contender")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    step, _ = build(name)
    for _ in range(warmup):
        step()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    print(f"{name}: {(time.perf_counter() - start) / steps * 1000:.2f} ms per step under the profiler", file=sys.stderr)
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def figures(times: list[list[float]], reference: list[list[float]]) -> dict[str, float]:
    """Fastest and median wall time, median CPU time (this process's, all its threads: what the host spent, however
    busy the machine), each in ms and as a ratio to the reference's same figure."""
    def stats(ts: list[list[float]]) -> tuple[float, float, float]:
        return min(t[0] for t in ts), statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)

    mine, ref = stats(times), stats(reference)
    keys = ("fastest", "median", "cpu_median")
    return {**{f"{k}_ms": v * 1e3 for k, v in zip(keys, mine)}, **{f"{k}_ratio": v / r for k, v, r in zip(keys, mine, ref)}}


def print_table(rows: dict[str, dict[str, Any]], load: dict[str, list[float]], what: str) -> None:
    out = sys.stderr
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {what}; load average {load['launch']} at launch, {load['before']} "
          f"before timing, {load['after']} after", file=out)
    print(f"{'contender':16s} {'procs':>5s} {'fastest ms':>10s} {'median ms':>10s} {'CPU ms':>8s} {'x fastest':>10s} "
          f"{'x median':>9s} {'x CPU':>7s} {'|loss diff|':>11s}", file=out)
    for name, r in rows.items():
        print(f"{name:16s} {r['processes']:5d} {r['fastest_ms']:10.2f} {r['median_ms']:10.2f} {r['cpu_median_ms']:8.2f} "
              f"{r['fastest_ratio']:9.2f}x {r['median_ratio']:8.2f}x {r['cpu_median_ratio']:6.2f}x "
              f"{r['max_loss_diff']:11.1e}", file=out)


def main(contenders: list[str] | None = None, rounds: int = 7, steps: int = 20, warmup: int = 10,
         out: str | None = None, fused: bool = False, profile_steps: int = 50, top: int = 25, numactl: bool = False,
         worker: str | None = None, profile: str | None = None) -> dict[str, Any] | None:
    """Time every contender (each its own process, alternated); print the table and the JSON.

    Args:
        contenders: which (default all): bare, single, single-noguard, zero0-3, fsdp2, bare-ddp, ddp; zeroN@DIR
            is zeroN with DIR/zeroN.json instead of ds_configs/zeroN.json (to time other DeepSpeed settings).
        rounds: rounds; each gives every contender one block of `steps` timed steps, the order reversed every other.
        steps: steps per block.
        warmup: untimed steps per contender first.
        out: also write the JSON here.
        profile: cProfile this one contender in this process instead (profile_steps steps; top functions).
        fused: torch's fused AdamW in every contender (tlm's default on CUDA) instead of the for-each one.
        numactl: keep DeepSpeed's CPU-only `numactl` subprocess per device_count() call (cached by default).
    """
    if fused:
        os.environ["HOST_OVERHEAD_FUSED"] = "1"  # read by the workers, which inherit it
    if numactl:
        os.environ["HOST_OVERHEAD_NUMACTL"] = "1"  # read by the workers, which inherit it
    if worker:
        run_worker(worker, warmup)
        return None
    if profile:
        run_profile(profile, profile_steps, warmup, top)
        return None
    names = list(contenders or CONTENDERS)
    for name in names:
        spec(name)  # refuses an unknown one before anything starts
    for name in names:  # every contender needs its reference
        if reference(name) not in names:
            names.insert(0, reference(name))
    run = drive(names, rounds, steps, warmup)
    rows = {}
    for name in names:
        rows[name] = figures(run["times"][name], run["times"][reference(name)])
        rows[name].update(processes=spec(name).processes, reference=reference(name), losses=run["losses"][name],
                          max_loss_diff=max(abs(a - b) for a, b in zip(run["losses"][name], run["losses"][reference(name)])))
    print_table(rows, run["load_average"], f"{rounds} rounds x {steps} steps, warmup {warmup}")
    import torch

    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rounds": rounds, "steps": steps, "warmup": warmup,
              "torch": torch.__version__, "load_average": run["load_average"], "model": BASE, "rows": rows}
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
