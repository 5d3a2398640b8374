"""Muon beside AdamW (tlm.training.muon): the composite steps as torch's two optimizers do, checkpoints and resumes
exactly, runs at its own rate, is refused where it cannot run, and a resume takes the configured hyperparameters.
The backends' equal losses on 2 processes are in test_train_distributed.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tlm.model.config import get_preset
from tlm.model.transformer import TransformerLM
from tlm.training.config import load_config
from tlm.training.muon import MuonAdamW
from tlm.training.optim import build_optimizer, hidden_matrices, param_groups
from tlm.training.trainer import train
from tlm_base.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def model_and_batch(seed: int = 0) -> tuple[TransformerLM, torch.Tensor]:
    torch.manual_seed(seed)
    return TransformerLM(get_preset("debug")), torch.randint(0, 512, (2, 16))


def backward(model: TransformerLM, ids: torch.Tensor) -> None:
    model(ids, labels=ids).backward()


def take_steps(model: TransformerLM, optimizer: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        backward(model, ids)
        optimizer.step()
        optimizer.zero_grad()


def muon_config(**overrides):
    return load_config(CONFIGS / "debug.yaml", {"optim.name": "muon", "train.backend": "single",
                                                "optim.decay_norms_and_embeddings": False, **overrides})


def test_the_hidden_matrices_are_muons_and_the_rest_adamws() -> None:
    model, _ = model_and_batch()
    matrices = {id(p) for p in hidden_matrices(model)}
    names = {n for n, p in model.named_parameters() if id(p) in matrices}
    assert len(names) == 7 * len(model.layers)  # q, k, v, o, gate, up, down
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    optimizer = build_optimizer(model, muon_config().optim)
    assert [(g["optimizer"], g["role"]) for g in optimizer.param_groups] == [
        ("muon", "muon"), ("adamw", "decay"), ("adamw", "exempt")]
    assert optimizer.param_groups[0]["momentum"] == 0.95 and optimizer.param_groups[0]["nesterov"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_a_step_is_torchs_muon_and_adamw_stepped_apart() -> None:
    """Bit for bit: the composite is a grouping, not another algorithm."""
    config = muon_config()
    model, ids = model_and_batch()
    reference, _ = model_and_batch()
    composite = build_optimizer(model, config.optim)
    matrices = hidden_matrices(reference)
    muon = torch.optim.Muon(matrices, lr=config.optim.muon_lr, weight_decay=config.optim.weight_decay)
    rest = param_groups(reference, config.optim, exclude={id(p) for p in matrices})
    adamw = torch.optim.AdamW(rest, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps, foreach=True)
    for _ in range(3):
        for m, steppers in ((model, [composite]), (reference, [muon, adamw])):
            backward(m, ids)
            for s in steppers:
                s.step()
                s.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_its_state_resumes_exactly() -> None:
    config = muon_config()
    straight, ids = model_and_batch()
    take_steps(straight, build_optimizer(straight, config.optim), ids, 4)
    resumed, _ = model_and_batch()
    first = build_optimizer(resumed, config.optim)
    take_steps(resumed, first, ids, 2)
    second = build_optimizer(resumed, config.optim)  # a fresh optimizer over the same weights, loaded
    second.load_state_dict(first.state_dict())
    assert isinstance(second, MuonAdamW)
    assert second._muon.state is second.state and second._muon.param_groups[0] is second.param_groups[0]
    take_steps(resumed, second, ids, 2)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_clipping_and_the_nonfinite_guard_for_zero0() -> None:
    config = muon_config()
    model, ids = model_and_batch()
    optimizer = build_optimizer(model, config.optim, clipping=True, skip_nonfinite=True)
    backward(model, ids)
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).grad.fill_(math.nan)
    optimizer.step()
    assert optimizer.overflow and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer.zero_grad()
    backward(model, ids)
    optimizer.step()
    assert not optimizer.overflow and float(optimizer._global_grad_norm) > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_1_to_3_are_refused_in_one_line_naming_the_way_out(stage: int) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(CONFIGS / "debug.yaml", {"optim.name": "muon", "train.backend": "deepspeed",
                                             "train.zero_stage": stage})
    message = str(refused.value)
    assert "\n" not in message and f"ZeRO-{stage}" in message
    assert "--train.backend=ddp" in message and "--train.zero_stage=0" in message and "--train.backend=fsdp2" in message


@pytest.mark.parametrize("key, value", [("optim.muon_lr", 0.0), ("optim.muon_momentum", 1.0),
                                        ("optim.muon_ns_steps", 0), ("optim.muon_weight_decay", -1.0),
                                        ("optim.muon_adjust_lr_fn", "rms")])
def test_bad_muon_settings_are_refused_by_key(key: str, value) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        muon_config(**{key: value})


def base_run(prepared: Path, run_dir: Path, **extra):
    return load_config(CONFIGS / "debug.yaml", {
        "data.prepared": str(prepared), "logging.run_dir": str(run_dir), "logging.sample_prompt": None,
        "logging.wandb": "disabled", "logging.progress": False, "train.backend": "single", "train.precision": "fp32",
        "train.max_steps": 6, "eval.every": 0, "checkpoint.every": 0, "logging.log_every": 1, "optim.name": "muon",
        **extra})


def test_muon_trains_at_its_own_rate_and_resumes_exactly(tmp_path: Path, prepared: Path) -> None:
    straight = train(base_run(prepared, tmp_path / "a"))
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert straight["losses"][-1] < straight["losses"][0]
    train(base_run(prepared, tmp_path / "b", **{"train.stop_at": 3}))
    resumed = train(base_run(prepared, tmp_path / "b"))
    assert resumed["losses"] == straight["losses"][3:]  # bit for bit (the losses of this session)
    assert [r["lr"] for r in records if "lr" in r][0] > 0
    adamw = train(base_run(prepared, tmp_path / "c", **{"optim.name": "adamw"}))
    assert adamw["losses"][0] == straight["losses"][0] and adamw["losses"][1:] != straight["losses"][1:]


def test_a_resume_takes_the_configured_hyperparameters_not_the_checkpoints(tmp_path: Path, prepared: Path) -> None:
    """--checkpoint.allow_change=optim.weight_decay used to be logged and then ignored: the optimizer's state dict
    brought the old weight decay back into its groups."""
    from tlm.training.backends.plain import PlainBackend

    run = tmp_path / "run"
    train(base_run(prepared, run, **{"train.stop_at": 3}))
    seen = {}
    original = PlainBackend.resume

    def spy(self, *args) -> None:
        original(self, *args)
        seen.update({g["role"]: (g["weight_decay"], g.get("momentum")) for g in self.optimizer.param_groups})

    PlainBackend.resume = spy
    try:
        train(base_run(prepared, run, **{"optim.weight_decay": 0.3, "optim.muon_momentum": 0.9,
                                          "checkpoint.allow_change": "optim.*"}))
    finally:
        PlainBackend.resume = original
    assert seen == {"muon": (0.3, 0.9), "decay": (0.3, None)}


def test_the_final_evaluation_also_gives_the_periodic_rows_loss(tmp_path: Path, prepared: Path) -> None:
    """The curve keeps one measure to the end: at a final evaluation of the whole split, val_loss_periodic is what
    a periodic evaluation gives (here: the evaluation of step 3 and the final one see the same weights)."""
    config = base_run(prepared, tmp_path / "run", **{"train.max_steps": 3, "eval.every": 3, "eval.max_batches": 2,
                                                     "eval.final_full": True, "optim.name": "adamw"})
    train(config)
    periodic = train(base_run(prepared, tmp_path / "p", **{"train.max_steps": 3, "eval.every": 3,
                                                           "eval.max_batches": 2, "optim.name": "adamw"}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_loss" in r][-1]
    assert final["val_tokens"] > periodic["val_tokens"]
    assert final["val_loss_periodic"] == periodic["val_loss"] != final["val_loss"]


def test_a_resume_with_another_optimizer_is_refused(tmp_path: Path, prepared: Path) -> None:
    from tlm_base.errors import CheckpointError

    run = tmp_path / "run"
    train(base_run(prepared, run, **{"train.stop_at": 3, "optim.name": "adamw"}))
    with pytest.raises(CheckpointError) as refused:
        train(base_run(prepared, run, **{"checkpoint.allow_change": "optim.*"}))
    assert 'optim.name: "adamw" -> "muon"' in str(refused.value) and "\n" not in str(refused.value)
