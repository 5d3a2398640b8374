"""`tlm plan`: parameter counts from shapes, model states against DeepSpeed's own estimators, activations, the
recommendation, and the line `tlm train` prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tlm.cli import main
from tlm.model.config import get_preset
from tlm.model.transformer import TransformerLM
from tlm.training.plan import (activation_bytes, fsdp2_units, model_state_bytes, parameter_counts, parse_bytes, plan_rows,
                               recommend, size_guide, size_guide_line)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("preset,overrides", [("tlm-26m", {}), ("llama-1b-shape", {}), ("debug", {"norm": "none"}),
                                              ("debug", {"mlp": "silu", "tie_word_embeddings": False}),
                                              ("debug", {"num_key_value_heads": 1, "norm": "layernorm"})])
def test_parameter_counts_from_shapes_equal_the_model(preset: str, overrides: dict) -> None:
    config = get_preset(preset, **overrides)
    with torch.device("meta"):
        assert parameter_counts(config)[0] == TransformerLM(config).num_parameters()


@pytest.mark.parametrize("preset", ["tlm-26m", "minimind2-104m", "llama-1b-shape"])
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero_model_states_equal_deepspeeds_estimators(preset: str, gpus: int) -> None:
    stage2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    config = get_preset(preset)
    total, largest, _ = parameter_counts(config)
    _, ds2 = stage2.estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    _, ds3, _ = stage3.estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, cpu_offload=False,
                                                            cpu_offload_params=False)
    assert sum(model_state_bytes(config, "deepspeed", 2, gpus)) == pytest.approx(ds2, abs=2)
    assert sum(model_state_bytes(config, "deepspeed", 3, gpus)) == pytest.approx(ds3, abs=3)


def test_activations_shrink_with_checkpointing_and_the_chunked_loss() -> None:
    config = get_preset("tlm-26m")
    none, selective, full = (activation_bytes(config, 8, 512, mode) for mode in ("none", "selective", "full"))
    assert none > selective > full > 0
    assert activation_bytes(config, 8, 512, loss_chunk=1024) < none
    assert activation_bytes(config, 16, 512) == pytest.approx(2 * none, rel=1e-9)


def test_the_recommendation_is_the_cheapest_setting_that_fits() -> None:
    config = get_preset("llama-1b-shape")
    roomy = plan_rows(config, gpus=8, gpu_bytes=parse_bytes("80GiB"), micro_batch=4, seq_len=2048)
    assert recommend(roomy).backend == "ddp" and recommend(roomy).activation_checkpointing == "none"
    tight = plan_rows(config, gpus=8, gpu_bytes=parse_bytes("12GiB"), micro_batch=4, seq_len=2048)
    best = recommend(tight)
    assert best.fits and best.total <= parse_bytes("12GiB")
    assert all(not row.fits for row in tight[: tight.index(best)])  # everything cheaper does not fit
    assert recommend(plan_rows(config, gpus=1, gpu_bytes=parse_bytes("1GiB"), micro_batch=4, seq_len=2048)) is None
    assert parse_bytes("141GB") == 141 * 10**9 and parse_bytes("512MiB") == 512 * 2**20


def test_the_recommendation_shards_only_as_much_as_the_memory_needs() -> None:
    """By model size (here: less memory for one model): DDP while the model states fit whole, ZeRO-1 then ZeRO-2 while
    the parameters do, FSDP2 when they must be sharded, chosen before ZeRO-3, which fits too but costs more host time
    per step (docs/performance.md)."""
    config = get_preset("llama-1b-shape")

    def best(gpu_mem: str):
        rows = plan_rows(config, gpus=8, gpu_bytes=parse_bytes(gpu_mem), micro_batch=1, seq_len=512, loss_chunk=4096)
        return recommend(rows), {row.name for row in rows if row.fits}

    assert [(row.backend, row.zero_stage) for row, _ in map(best, ["80GiB", "12GiB", "6GiB", "4GiB"])] == [
        ("ddp", None), ("deepspeed", 1), ("deepspeed", 2), ("fsdp2", None)]
    chosen, fitting = best("4GiB")
    assert chosen.activation_checkpointing == "none" and "deepspeed ZeRO-3, checkpointing none" in fitting
    guide = size_guide(8, parse_bytes("80GiB"))
    assert list(guide) == ["single/DDP", "DeepSpeed ZeRO-1", "DeepSpeed ZeRO-2", "FSDP2", "DeepSpeed ZeRO-3"]
    assert guide["single/DDP"] < guide["DeepSpeed ZeRO-1"] < guide["DeepSpeed ZeRO-2"] < guide["FSDP2"]
    assert guide["single/DDP"] == int(parse_bytes("80GiB") / 1.1 / 18)  # 18 bytes of model states per parameter
    assert "single/DDP up to 4.34B parameters, then DeepSpeed ZeRO-1 up to 13.02B" in size_guide_line(8, parse_bytes("80GiB"))
    assert "ZeRO-1" not in size_guide_line(1, parse_bytes("80GiB"))  # one GPU: sharding saves nothing


@pytest.mark.parametrize("preset,units", [("tlm-26m", []), ("minimind2-104m", [list(range(8)), list(range(8, 16))]),
                                          ("llama-1b-shape", [[i] for i in range(16)])])
def test_fsdp2_shards_small_layers_together(preset: str, units: list) -> None:
    """FSDP2's units: consecutive decoder layers up to 5e7 parameters (each unit costs host time every step), the root
    alone for a model within that, a larger layer alone; the plan counts the largest unit as gathered."""
    config = get_preset(preset)
    total, _, block = parameter_counts(config)
    assert fsdp2_units([block] * config.num_hidden_layers, total) == units
    unit = max(len(u) for u in units) * block if units else total
    assert model_state_bytes(config, "fsdp2", None, 8)[0] == 4 * total // 8 + 4 * unit


def test_plan_command_reads_a_recipe(capsys: pytest.CaptureFixture) -> None:
    main(["plan", "--config", str(CONFIGS / "llama-1b-shape.yaml"), "--gpus", "8", "--gpu_mem", "24GiB"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seq_len"] == 2048 and out["micro_batch"] == 4 and out["loss_chunk"] == 4096
    assert out["recommended"] is not None and len(out["rows"]) == 18
    assert out["by_model_size"] == size_guide(8, parse_bytes("24GiB"))


def test_training_states_its_memory_plan(tmp_path: Path, prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tlm.training.config import load_config
    from tlm.training.trainer import train

    with caplog.at_level(logging.INFO, logger="tlm"):
        train(load_config(CONFIGS / "debug.yaml", {"data.prepared": str(prepared), "logging.run_dir": str(tmp_path / "r"),
                                                   "logging.wandb": "disabled", "logging.sample_prompt": None,
                                                   "train.max_steps": 1, "eval.every": 0}))
    assert any(r.getMessage().startswith("memory plan: single, checkpointing none:") for r in caplog.records)


@pytest.mark.parametrize("gpu_mem, fits, line", [
    ("80GiB", True, "the recipe's setting (deepspeed ZeRO-1, checkpointing none) fits; cheaper here: ddp, checkpointing "
                    "none (--train.backend=single --train.activation_checkpointing=none)"),
    ("16GiB", False, "the recipe's setting (deepspeed ZeRO-1, checkpointing none) does not fit; the cheapest that does: "
                     "deepspeed ZeRO-1, checkpointing selective, with --train.backend=deepspeed --train.zero_stage=1 "
                     "--train.activation_checkpointing=selective")])
def test_plan_compares_the_recipe_with_the_cheapest(gpu_mem: str, fits: bool, line: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    """The recipe's own setting is a row of the plan, said to fit or not beside the cheapest (defined: the least
    recomputation, then the least sharding), with the flags that choose the cheapest; those flags make it the recipe's."""
    recipe = str(CONFIGS / "llama-1b-shape.yaml")
    main(["plan", "--config", recipe, "--gpus", "8", "--gpu_mem", gpu_mem])
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["recipe_setting"] == "deepspeed ZeRO-1, checkpointing none" and out["recipe_setting_fits"] is fits
    assert line in captured.err and out["recommended"] in line
    flags = line.split("(--")[-1].rstrip(")") if fits else line.split("with --")[-1]
    main(["plan", "--config", recipe, "--gpus", "8", "--gpu_mem", gpu_mem, *[f"--{f.lstrip('-')}" for f in
                                                                             flags.split()]])
    again = capsys.readouterr()
    assert f"the recipe's setting ({out['recommended']}) is the cheapest that fits" in again.err


def test_a_run_on_a_gpu_says_whether_its_setting_is_the_cheapest(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """At start-up on a GPU, the plan's line for the run's setting, then how it compares with the cheapest that fits
    that GPU; a setting past the GPU's memory is refused before anything is built (the GPU is faked: its memory)."""
    from types import SimpleNamespace

    from tlm.training.config import load_config
    from tlm.training.plan import check_memory
    from tlm_base.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d: "a GPU of 80 GiB")
    config = load_config(CONFIGS / "llama-1b-shape.yaml")
    with caplog.at_level(logging.INFO, logger="tlm"):
        check_memory(config.model, config, config.batch_shape(8), torch.device("cuda", 0), True)
    assert ("memory plan on this GPU: this run's setting (deepspeed ZeRO-1, checkpointing none) fits; cheaper here: "
            "ddp, checkpointing none (--train.backend=single") in caplog.text
    with pytest.raises(ConfigError, match="more than the 80.0 GiB of a GPU of 80 GiB; `tlm plan --config RECIPE"):
        big = load_config(CONFIGS / "llama-1b-shape.yaml", {"batch.micro_batch_size": 32})  # 110 GiB of activations
        check_memory(big.model, big, big.batch_shape(8), torch.device("cuda", 0), False)


def test_muon_keeps_one_momentum_per_hidden_matrix_parameter_and_leaves_zero_1_to_3_out() -> None:
    """The plan's Muon saving is 4 bytes per parameter of the matrices the optimizer gives Muon (counted here from the
    model itself), and it offers no setting that Muon is refused under."""
    from tlm.training.optim import hidden_matrices

    config = get_preset("tlm-26m")
    with torch.device("meta"):
        matrices = sum(p.numel() for p in hidden_matrices(TransformerLM(config)))
    for backend, stage, gpus, shard in (("ddp", None, 2, 1), ("deepspeed", 0, 1, 1), ("fsdp2", None, 4, 4)):
        adamw = model_state_bytes(config, backend, stage, gpus)
        muon = model_state_bytes(config, backend, stage, gpus, "muon")
        assert adamw[:2] == muon[:2] and adamw[2] - muon[2] == pytest.approx(4 * matrices / shard, abs=1)
    rows = plan_rows(config, gpus=8, gpu_bytes=parse_bytes("80GiB"), micro_batch=4, seq_len=512, optimizer="muon")
    assert {(r.backend, r.zero_stage) for r in rows} == {("ddp", None), ("deepspeed", 0), ("fsdp2", None)}
