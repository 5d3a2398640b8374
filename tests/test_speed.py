"""The speed options are correct: fused AdamW, chunked loss and torch.compile give the same losses; the for-each AdamW
and ZeRO-0's own clipping give the same bits as before; tlm bench prints its figures; on CUDA the step loop does not
synchronise with the host, and no micro-step of any backend does (docs/performance.md counts the syncs)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlm.training.trainer import train
from tlm.training.config import load_config

REPO = Path(__file__).resolve().parent.parent


def losses(prepared: Path, run_dir: Path, **overrides) -> list[float]:
    config = load_config(REPO / "configs" / "debug.yaml", {
        "data.prepared": str(prepared), "logging.run_dir": str(run_dir), "logging.sample_prompt": None,
        "logging.wandb": "disabled", "train.max_steps": 4, "checkpoint.every": 0, "eval.every": 0, **overrides})
    return [h["loss"] for h in train(config)["history"] if "loss" in h]


@pytest.mark.parametrize("option", [{"train.fused_adamw": True}, {"train.loss_chunk": 50},
                                    {"train.loss_chunk": 50, "batch.micro_batch_size": 2}])
def test_speed_options_keep_the_losses(tmp_path: Path, prepared: Path, option: dict) -> None:
    reference = losses(prepared, tmp_path / "reference")
    for a, b in zip(reference, losses(prepared, tmp_path / "option", **option)):
        assert abs(a - b) < 1e-5, (reference, option)


def test_compiled_model_keeps_the_losses(tmp_path: Path, prepared: Path) -> None:
    reference = losses(prepared, tmp_path / "eager", **{"train.max_steps": 3})
    compiled = losses(prepared, tmp_path / "compiled", **{"train.max_steps": 3, "train.compile": True})
    for a, b in zip(reference, compiled):
        assert abs(a - b) < 1e-4, (reference, compiled)


def test_the_for_each_adamw_gives_the_per_parameter_loops_bits() -> None:
    """Off CUDA torch picks AdamW's per-parameter loop by itself; tlm asks for the for-each one (one operation over all
    the parameters: less host time, docs/performance.md), which gives the same weights bit for bit."""
    from tlm.model.config import get_preset
    from tlm.model.transformer import TransformerLM
    from tlm.training.optim import adamw, param_groups
    from tlm.training.sections import OptimSection

    optim = OptimSection(lr=1e-3, weight_decay=0.1, decay_norms_and_embeddings=False)
    ids = torch.randint(0, 6400, (6, 2, 33), generator=torch.Generator().manual_seed(1))
    weights = []
    for kind in ("tlm", "loop"):
        torch.manual_seed(0)
        model = TransformerLM(get_preset("debug"))
        groups = param_groups(model, optim)
        optimizer = adamw(groups, optim, fused=False) if kind == "tlm" else torch.optim.AdamW(
            groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=False)
        assert optimizer.defaults["foreach"] is (kind == "tlm")
        for batch in ids:
            model(batch[:, :-1], labels=batch[:, 1:]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_zero0_steps_as_the_plain_backend(tmp_path: Path, prepared: Path) -> None:
    """DeepSpeed ZeRO-0 steps tlm's ClippingAdamW, which clips as the plain backend does (DeepSpeed's own ZeRO-0
    clipping walked the parameters in Python and all-reduced the norm): in one fp32 process, the same losses bit for
    bit, with and without the NaN guard."""
    single = losses(prepared, tmp_path / "single", **{"train.max_steps": 6})
    assert losses(prepared, tmp_path / "zero0", **{"train.max_steps": 6, "train.backend": "deepspeed",
                                                    "train.zero_stage": 0}) == single
    assert losses(prepared, tmp_path / "zero0-off", **{"train.max_steps": 6, "train.backend": "deepspeed",
                                                        "train.zero_stage": 0, "train.nan_policy": "off"}) == single


def test_fsdp2_units_keep_the_losses(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 shards a model this small as one unit (the root); as one unit per layer (what a larger model gets) the
    losses are the same, bit for bit in one fp32 process."""
    import tlm.training.plan as plan

    root = losses(prepared, tmp_path / "root", **{"train.backend": "fsdp2"})
    monkeypatch.setattr(plan, "FSDP2_UNIT", 1)  # every layer past the budget: a unit each
    assert plan.fsdp2_units([10, 10], 20) == [[0], [1]]
    assert losses(prepared, tmp_path / "layers", **{"train.backend": "fsdp2"}) == root


def test_bench_prints_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "tlm", "bench", "--preset", "debug", "--batch", "2", "--seq_len", "32",
                             "--steps", "2", "--warmup", "1", "--loss_chunk", "16", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    row = figures["rows"]["single"]
    assert row["tokens_per_s"] > 0 and row["step_time"] > 0 and 0 < row["mfu_vs_measured_matmul"]
    assert figures["flops_per_token"] > 0 and figures["measured_matmul_flops"] > 0
    assert json.loads(out.read_text()) == figures
    assert "tokens/s" in result.stderr and "MFU" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_step_loop_never_waits_for_the_gpu(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a training step nothing reads a GPU value back: synchronising calls raise in this mode
    (the loss is read only at log steps, outside the step)."""
    from tlm.training.trainer import Trainer

    original = Trainer.train_step
    calls = {"n": 0}

    def strict(self):
        calls["n"] += 1
        if calls["n"] <= 2:  # first steps: lazy CUDA initialisation may synchronise
            return original(self)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "train_step", strict)
    # nan_policy off: the NaN check reads the grad norm back once a step (docs/performance.md)
    assert len(losses(prepared, tmp_path / "run", **{"train.max_steps": 6, "train.precision": "bf16",
                                                     "train.nan_policy": "off"})) == 6


ONE_GPU = {"single": {"train.backend": "single"},
           **{f"zero{stage}": {"train.backend": "deepspeed", "train.zero_stage": stage} for stage in range(4)},
           "fsdp2": {"train.backend": "fsdp2"}}


@contextlib.contextmanager
def cuda_syncs():
    """The host-device synchronisations inside, counted (torch's sync debug mode "warn": one warning each)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("guard", ["skip", "off"])
@pytest.mark.parametrize("backend", ONE_GPU)
def test_no_micro_step_waits_for_the_gpu(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch, backend: str,
                                         guard: str) -> None:
    """Every backend on one GPU, two micro-batches a step: no micro-step that does not end the step reads the device
    back. The optimizer step of single and FSDP2 reads it once with the NaN guard and never without. DeepSpeed's last
    micro-step runs its optimizer step (engine.step()) and ZeRO-3's backward ends in a stream synchronize of its
    own: those are DeepSpeed's (docs/performance.md counts them), not asserted here."""
    import tlm.training.trainer as trainer_module

    build, counts = trainer_module.make_backend, {"micro": [], "last": [], "step": []}

    def counted(*args, **kwargs):
        built = build(*args, **kwargs)
        micro_step, optimizer_step = built.micro_step, built.optimizer_step

        def micro(batch, scale, last):
            with cuda_syncs() as found:
                result = micro_step(batch, scale, last)
            counts["last" if last else "micro"].append(found)
            return result

        def step():
            with cuda_syncs() as found:
                result = optimizer_step()
            counts["step"].append(found)
            return result

        built.micro_step, built.optimizer_step = micro, step
        return built

    monkeypatch.setattr(trainer_module, "make_backend", counted)
    assert len(losses(prepared, tmp_path / "run", **ONE_GPU[backend], **{
        "train.max_steps": 6, "train.precision": "bf16", "train.nan_policy": guard, "batch.micro_batch_size": 2,
        "batch.global_batch_size": 4, "logging.log_every": 3})) == 2
    warm = 2  # the first steps: lazy CUDA initialisation may synchronise
    micro, last, step = (counts[k][warm:] for k in ("micro", "last", "step"))
    assert len(micro) == len(last) == len(step) == 4
    if backend != "zero3":
        assert all(not found for found in micro), micro
    if backend in ("single", "fsdp2"):
        assert all(not found for found in last), last
        assert all(len(found) == (1 if guard == "skip" else 0) for found in step), step
