"""Every backend on 1 and 2 CPU processes (gloo): equal losses, exact resume, resume on another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.prepare import PrepareConfig, prepare
from tlm.training.distributed import free_port

BACKENDS = {
    "ddp": {"train.backend": "ddp"},
    "zero0": {"train.backend": "deepspeed", "train.zero_stage": 0},
    "zero1": {"train.backend": "deepspeed", "train.zero_stage": 1},
    "zero2": {"train.backend": "deepspeed", "train.zero_stage": 2},
    "zero3": {"train.backend": "deepspeed", "train.zero_stage": 3},
    "fsdp2": {"train.backend": "fsdp2"},
    # Muon for the hidden matrices (AdamW for the rest): the backends it runs under
    "muon-ddp": {"train.backend": "ddp", "optim.name": "muon"},
    "muon-zero0": {"train.backend": "deepspeed", "train.zero_stage": 0, "optim.name": "muon"},
    "muon-fsdp2": {"train.backend": "fsdp2", "optim.name": "muon"},
}
MUON = [name for name in BACKENDS if name.startswith("muon-")]
DRIVER = Path(__file__).with_name("dist_driver.py")


def base(prepared: Path, run_dir: Path, **extra) -> dict:
    return {
        "model.preset": "debug", "data.prepared": str(prepared), "data.seq_len": 64,
        "batch.micro_batch_size": 4, "batch.global_batch_size": 8, "train.max_steps": 6, "train.precision": "fp32",
        "eval.every": 0, "eval.max_batches": 3, "eval.at_start": True, "checkpoint.every": 0, "logging.log_every": 1,
        "logging.progress": False, "logging.sample_prompt": None, "logging.run_dir": str(run_dir), **extra,
    }


def launch(plan: list[dict], workdir: Path, processes: int) -> dict:
    plan_file, results = workdir / f"plan-{processes}.json", workdir / f"results-{processes}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        command = [sys.executable, str(DRIVER), str(plan_file), str(results)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), str(DRIVER), str(plan_file), str(results)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(results.read_text())



@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path, shakespeare_jsonl: Path) -> dict:
    work = tmp_path_factory.mktemp("distributed")
    prepared = work / "data"
    prepare(PrepareConfig(data=[str(shakespeare_jsonl)], tokenizer=str(data_tokenizer), out=str(prepared), seq_len=64,
                          val=0.05), progress=False)
    two = []
    for name, backend in BACKENDS.items():
        two += [
            {"name": f"{name}-fp32", "overrides": base(prepared, work / "2p" / f"{name}-fp32", **backend)},
            {"name": f"{name}-bf16", "overrides": base(prepared, work / "2p" / f"{name}-bf16", **backend,
                                                       **{"train.precision": "bf16"})},
            {"name": f"{name}-half", "overrides": base(prepared, work / "2p" / f"{name}-resume", **backend,
                                                       **{"train.stop_at": 3})},
            {"name": f"{name}-resumed", "overrides": base(prepared, work / "2p" / f"{name}-resume", **backend)},
            {"name": f"{name}-half-for-1", "overrides": base(prepared, work / "2p" / f"{name}-to1", **backend,
                                                             **{"train.stop_at": 3})},
            {"name": f"{name}-checkpointed", "overrides": base(prepared, work / "2p" / f"{name}-ac", **backend,
                                                               **{"train.activation_checkpointing": "full",
                                                                  "train.loss_chunk": 96})},
        ]
    results = launch(two, work, 2)
    one = []
    for name, backend in BACKENDS.items():
        single = {**backend, "train.backend": "single"} if name.endswith("ddp") else backend  # single resumes DDP's
        one += [
            {"name": f"{name}-fp32", "overrides": base(prepared, work / "1p" / f"{name}-fp32", **single)},
            {"name": f"{name}-bf16", "overrides": base(prepared, work / "1p" / f"{name}-bf16", **single,
                                                       **{"train.precision": "bf16"})},
            {"name": f"{name}-from-2", "overrides": base(prepared, work / "2p" / f"{name}-to1", **single)},
        ]
    three = [{"name": "ddp-fp32", "overrides": base(prepared, work / "3p" / "ddp-fp32", **BACKENDS["ddp"],
                                                    **{"train.max_steps": 1, "batch.global_batch_size": 12})}]
    return {"two": results, "one": launch(one, work, 1), "three": launch(three, work, 3)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_and_two_processes_agree(runs: dict, backend: str) -> None:
    one, two = runs["one"][f"{backend}-fp32"], runs["two"][f"{backend}-fp32"]
    assert one["world_size"] == 1 and two["world_size"] == 2 and len(one["losses"]) == 6
    assert one["losses"][-1] < one["losses"][0]
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) < 5e-6, (one["losses"], two["losses"])
    one, two = runs["one"][f"{backend}-bf16"], runs["two"][f"{backend}-bf16"]
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) < 1e-3, (one["losses"], two["losses"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_is_the_same_on_any_number_of_ranks(runs: dict, backend: str) -> None:
    """eval.max_batches counts batches in all, each batch goes to one rank and the figures are summed in batch
    order: the same tokens and the same loss, bit for bit in fp32 (it used to count batches per rank: one process
    evaluated 512 tokens, two 1,024)."""
    first = [runs[world][f"{backend}-fp32"]["validation"][0] for world in ("one", "two")]
    if backend == "ddp":
        first.append(runs["three"]["ddp-fp32"]["validation"][0])
    assert all(v["step"] == 0 for v in first)
    assert first[0]["val_tokens"] == 3 * 4 * 64  # max_batches x the micro-batch x seq_len
    assert all(v == first[0] for v in first[1:]), first


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_gives_the_same_losses(runs: dict, backend: str) -> None:
    straight = runs["two"][f"{backend}-fp32"]["losses"]
    assert runs["two"][f"{backend}-half"]["losses"] == straight[:3]
    assert runs["two"][f"{backend}-resumed"]["losses"] == straight[3:]  # bit-identical in fp32


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_two_process_checkpoint_continues_on_one(runs: dict, backend: str) -> None:
    straight = runs["two"][f"{backend}-fp32"]["losses"]
    resumed = runs["one"][f"{backend}-from-2"]
    assert resumed["world_size"] == 1 and resumed["steps"] == 6
    for a, b in zip(resumed["losses"], straight[3:]):
        assert abs(a - b) < 5e-6, (resumed["losses"], straight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_checkpointing_with_the_chunked_loss_keeps_the_losses(runs: dict, backend: str) -> None:
    straight = runs["two"][f"{backend}-fp32"]["losses"]
    checkpointed = runs["two"][f"{backend}-checkpointed"]["losses"]
    assert len(checkpointed) == len(straight) == 6
    # Muon orthogonalises in bf16 (torch's Newton-Schulz): gradients equal to rounding (the chunked loss sums in
    # another order) give updates equal to bf16's rounding, 1.1e-5 apart in the loss after 6 steps
    assert checkpointed == pytest.approx(straight, abs=5e-5 if backend in MUON else 1e-6, rel=0)


def test_muon_gives_equal_losses_under_every_backend_it_runs_under(runs: dict) -> None:
    """DDP's torch Muon on averaged gradients, ZeRO-0 stepping the same optimizer, FSDP2 gathering each matrix's
    update: one algorithm, so the losses agree as the AdamW backends' do; and they are not AdamW's."""
    losses = {name: runs["two"][f"{name}-fp32"]["losses"] for name in MUON}
    for name in MUON[1:]:
        assert losses[name] == pytest.approx(losses[MUON[0]], abs=5e-6, rel=0), losses
    assert losses[MUON[0]][0] == pytest.approx(runs["two"]["ddp-fp32"]["losses"][0], abs=5e-6)
    assert abs(losses[MUON[0]][-1] - runs["two"]["ddp-fp32"]["losses"][-1]) > 1e-3
