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
from tlm.training.plan import activation_bytes, model_state_bytes, parameter_counts, parse_bytes, plan_rows, recommend

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


def test_plan_command_reads_a_recipe(capsys: pytest.CaptureFixture) -> None:
    main(["plan", "--config", str(CONFIGS / "llama-1b-shape.yaml"), "--gpus", "8", "--gpu_mem", "24GiB"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seq_len"] == 2048 and out["micro_batch"] == 4 and out["loss_chunk"] == 4096
    assert out["recommended"] is not None and len(out["rows"]) == 18


def test_training_states_its_memory_plan(tmp_path: Path, prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tlm.training.config import load_config
    from tlm.training.trainer import train

    with caplog.at_level(logging.INFO, logger="tlm"):
        train(load_config(CONFIGS / "debug.yaml", {"data.prepared": str(prepared), "logging.run_dir": str(tmp_path / "r"),
                                                   "logging.wandb": "disabled", "logging.sample_prompt": None,
                                                   "train.max_steps": 1, "eval.every": 0}))
    assert any(r.getMessage().startswith("memory plan: single, checkpointing none:") for r in caplog.records)
