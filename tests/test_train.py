"""The trainer in one process: config checks, schedule, loss normalisation, checkpoints, logging, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data_pipeline.prepare import PrepareConfig, prepare
from tlm_base.errors import DataError
from tlm.training.backends.plain import PlainBackend
from tlm.training.distributed import DistInfo
from tlm.checkpointing.model_dir import load_model_dir
from tlm.model.config import get_preset
from tlm_base.errors import CheckpointError, ConfigError
from tlm.model.flops import flops_per_token, matmul_params, peak_flops
from tlm.model.transformer import TransformerLM
from tlm.training.optim import lr_at, param_groups
from tlm.training.trainer import train
from tlm.training.config import TrainConfig, load_config
from tlm.training.sections import ScheduleSection

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_for(prepared: Path, run_dir: Path, **overrides) -> TrainConfig:
    values = {"data.prepared": str(prepared), "logging.run_dir": str(run_dir), "logging.sample_prompt": None,
              "logging.wandb": "disabled", **overrides}
    return load_config(CONFIGS / "debug.yaml", values)


# --- configuration -------------------------------------------------------------------------------------

def test_recipes_load() -> None:
    baseline = load_config(CONFIGS / "tlm-26m.yaml")
    with torch.device("meta"):
        assert TransformerLM(baseline.model).num_parameters() == 25_829_888
    assert (baseline.optim.lr, baseline.optim.betas, baseline.optim.weight_decay) == (5e-4, (0.9, 0.999), 0.01)
    assert baseline.batch_shape(1).accumulation_steps == 8 and baseline.batch_shape(8).accumulation_steps == 1
    assert baseline.batch_shape(4).global_batch_size == 256 and baseline.batch_shape(4).tokens_per_step == 256 * 512
    assert baseline.train.precision == "bf16" and baseline.schedule.min_lr_ratio == 0.1
    demo = load_config(CONFIGS / "cpu-demo.yaml")
    assert demo.train.backend == "single" and demo.name == "cpu-demo"
    for recipe, preset, stage in (("minimind2-104m", "minimind2-104m", 1), ("gpt2-small-shape", "gpt2-small-shape", 1),
                                  ("llama-1b-shape", "llama-1b-shape", 1)):
        config = load_config(CONFIGS / f"{recipe}.yaml")  # each larger preset has a recipe that loads and checks
        assert config.model == get_preset(preset) and config.train.zero_stage == stage
        assert config.batch_shape(8).global_batch_size == 256 and config.data.seq_len <= config.model.max_position_embeddings


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.learning_rate": 1.0}, r"unknown config key 'optim.learning_rate'; optim has: name, lr"),
        ({"optimiser.lr": 1.0}, r"unknown config key 'optimiser.lr' \(did you mean 'optim'\?\)"),
        ({"model.num_kv_heads": 1}, r"unknown model config key 'num_kv_heads'"),
        ({"batch.micro_batch_size": "big"}, r"config key 'batch.micro_batch_size' must be int"),
        ({"train.backend": "horovod"}, r"'train.backend' must be one of"),
        ({"batch.global_batch_size": 10}, r"global batch 10 sequences is not a multiple of micro_batch_size \(4\)"),
        ({"batch.global_batch_size": None, "batch.global_batch_tokens": 100},
         r"global_batch_tokens \(100\) is not a multiple of data.seq_len \(64\)"),
        ({"batch.global_batch_tokens": 512}, "not both"),
        ({"train.zero_stage": 4}, "must be 0, 1, 2 or 3"),
    ],
)
def test_bad_settings_are_refused_by_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "debug.yaml", overrides)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.max_stepz' \(did you mean 'train.max_steps'\?\)"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_batch_in_tokens_and_world_sizes() -> None:
    config = load_config(CONFIGS / "debug.yaml", {"batch.global_batch_size": None, "batch.global_batch_tokens": 1024})
    assert [config.batch_shape(world).accumulation_steps for world in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match=r"x world size \(3\)"):
        config.batch_shape(3)


def test_schedules() -> None:
    cosine = ScheduleSection(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, cosine) == pytest.approx(0.1) and lr_at(9, 100, 1.0, cosine) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, cosine) == pytest.approx(1.0) and lr_at(100, 100, 1.0, cosine) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, cosine) == pytest.approx(0.55)
    wsd = ScheduleSection(kind="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(79, 100, 1.0, wsd) == 1.0 and lr_at(89, 100, 1.0, wsd) == pytest.approx(0.5) and lr_at(99, 100, 1.0, wsd) == 0.0
    assert lr_at(50, 100, 1.0, ScheduleSection(kind="constant")) == 1.0


def test_weight_decay_exemption() -> None:
    model = TransformerLM(get_preset("debug"))
    config = load_config(CONFIGS / "debug.yaml", {"optim.decay_norms_and_embeddings": False})
    decay, keep = param_groups(model, config.optim)
    assert keep["weight_decay"] == 0.0 and any(p is model.embed_tokens.weight for p in keep["params"])
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2 * 7
    assert len(param_groups(model, load_config(CONFIGS / "debug.yaml").optim)) == 1


def test_flops_per_token_formula() -> None:
    config = get_preset("tlm-26m")
    assert matmul_params(config) == 25_829_888 - 8 * 2 * 512 - 512  # every weight but the norms (lm_head = embedding)
    assert flops_per_token(config, 512) == 6 * matmul_params(config) + 12 * 8 * 512 * 512
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None


# --- loss normalisation ----------------------------------------------------------------------------------

def test_gradient_is_that_of_the_mean_over_all_target_tokens() -> None:
    """Two micro-batches with different numbers of real tokens: the accumulated gradient must equal the
    gradient of (sum of all token losses) / (all tokens), not the mean of the two micro-batch means."""
    torch.manual_seed(0)
    config = load_config(CONFIGS / "debug.yaml")
    model = TransformerLM(get_preset("debug"))
    reference = TransformerLM(get_preset("debug"))
    reference.load_state_dict(model.state_dict())
    backend = PlainBackend(model, config, DistInfo(0, 1, 0, torch.device("cpu")))
    ids = torch.randint(0, 6400, (4, 17))
    masks = [torch.zeros(2, 16, dtype=torch.bool), torch.ones(2, 16, dtype=torch.bool)]
    masks[0][:, :3] = True  # 6 real tokens in the first micro-batch, 32 in the second
    total = sum(int(m.sum()) for m in masks)
    for i, mask in enumerate(masks):
        batch = {"input_ids": ids[2 * i : 2 * i + 2, :-1], "labels": ids[2 * i : 2 * i + 2, 1:], "loss_mask": mask}
        backend.micro_step(batch, loss_scale=1.0 / total, last=i == 1)
    logits = reference(ids[:, :-1])
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    (losses * torch.cat(masks).flatten()).sum().div(total).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


# --- a whole run ---------------------------------------------------------------------------------------

def test_a_run_logs_checkpoints_and_evaluates(tmp_path: Path, prepared: Path) -> None:
    summary = train(config_for(prepared, tmp_path / "run", **{"batch.global_batch_size": 8, "train.max_steps": 8}))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    config = load_config(CONFIGS / "debug.yaml")
    # One learning rate per optimizer step (2 micro-batches each), following the cosine.
    assert [r["lr"] for r in train_records] == [lr_at(s, 8, config.optim.lr, config.schedule) for s in range(8)]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train_records)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    last = evals[-1]  # bits per byte beside the loss: the same sum over the text's bytes
    assert last["val_bytes"] > last["val_tokens"]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * last["val_tokens"] / (math.log(2) * last["val_bytes"]))
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-00000004", "step-00000008"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    final = run / "checkpoints" / "step-00000008"
    assert (final / "COMPLETE").exists() and (final / "backend" / "state.pt").exists()
    state = json.loads((final / "trainer.json").read_text())
    assert state["step"] == 8 and state["stream"]["consumed_samples"] == 64 and state["config"]["name"] == "debug"
    model = load_model_dir(final / "model")
    assert (final / "model" / "tokenizer.json").exists() and model.config.eos_token_id == 0
    assert json.loads((run / "summary.json").read_text())["val_loss"] == summary["val_loss"] == evals[-1]["val_loss"]
    assert summary["val_bpb"] == last["val_bpb"]


def test_resume_auto_skips_an_incomplete_checkpoint(tmp_path: Path, prepared: Path) -> None:
    straight = train(config_for(prepared, tmp_path / "a", **{"train.max_steps": 8, "checkpoint.every": 2,
                                                            "checkpoint.keep_last": 10}))
    run = tmp_path / "b"
    train(config_for(prepared, run, **{"train.max_steps": 8, "train.stop_at": 6, "checkpoint.every": 2,
                                       "checkpoint.keep_last": 10}))
    (run / "checkpoints" / "step-00000006" / "COMPLETE").unlink()  # as if killed while saving step 6
    resumed = train(config_for(prepared, run, **{"train.max_steps": 8, "checkpoint.every": 2, "checkpoint.keep_last": 2}))
    losses = [h["loss"] for h in resumed["history"] if "loss" in h]
    assert losses == [h["loss"] for h in straight["history"] if "loss" in h][4:]  # resumed at step 4
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000008"]
    again = train(config_for(prepared, run, **{"train.max_steps": 8, "checkpoint.every": 2}))
    assert again["steps"] == 8 and again["history"] == []  # already complete: nothing trained


def test_no_pack_data_trains_with_the_loss_mask(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    data = tmp_path / "nopack"
    prepare(PrepareConfig(data=[str(shakespeare_jsonl)], tokenizer=str(data_tokenizer), out=str(data), seq_len=64,
                          pack=False, val=0.05), progress=False)
    summary = train(config_for(data, tmp_path / "run", **{"data.pack": False, "train.max_steps": 4}))
    assert summary["steps"] == 4 and summary["val_tokens"] < 2 * 8 * 64
    with pytest.raises(ConfigError, match="prepared in nopack mode"):
        train(config_for(data, tmp_path / "run2", **{"train.max_steps": 4}))


def test_wandb_offline_keeps_the_metrics(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(config_for(prepared, run, **{"train.max_steps": 3, "logging.wandb": "offline"}))
    folders = list((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    history = b"".join(p.read_bytes() for p in folders[0].glob("*.wandb"))  # what `wandb sync` would upload
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert b"val_loss" in history and b"tokens_per_s" in history
    for record in (r for r in logged if "session" not in r):  # each value is stored as its JSON text in the
        key = "loss" if "loss" in record else "val_loss"  # run's history records (the session line is not a figure)
        assert json.dumps(record[key]).encode() in history


def test_wandb_disabled_is_never_imported(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would raise
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert train(config_for(prepared, tmp_path / "run", **{"train.max_steps": 2, "logging.wandb": "auto"}))["steps"] == 2


def test_run_errors(tmp_path: Path, prepared: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(DataError, match="is not a prepared dataset"):
        train(config_for(tmp_path / "nowhere", tmp_path / "run"))
    other = tokenizer_dir  # a different BPE than the one the data was prepared with
    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        train(config_for(prepared, tmp_path / "run", **{"data.tokenizer": str(other)}))
    with pytest.raises(DataError, match="its tokenizer has 1000 tokens but the model's vocab_size is 512"):
        train(config_for(prepared, tmp_path / "run", **{"model.vocab_size": 512}))
    with pytest.raises(DataError, match="prepared for seq_len 64, the run uses 32"):
        train(config_for(prepared, tmp_path / "run", **{"data.seq_len": 32}))
    train(config_for(prepared, tmp_path / "done", **{"train.max_steps": 2}))
    try:
        with pytest.raises(CheckpointError, match="written by backend single"):
            train(config_for(prepared, tmp_path / "done", **{"train.max_steps": 4, "train.backend": "fsdp2"}))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # fsdp2 started a one-process group before the refusal
            dist.destroy_process_group()


def test_raw_text_is_tokenized_and_prepared_on_first_use(tmp_path: Path, shakespeare_jsonl: Path) -> None:
    overrides = {"data.source": str(shakespeare_jsonl), "data.vocab_size": 500, "data.cache_dir": str(tmp_path / "cache"),
                 "logging.run_dir": str(tmp_path / "run"), "logging.wandb": "disabled", "train.max_steps": 2,
                 "logging.sample_prompt": "ROMEO:"}
    summary = train(load_config(CONFIGS / "debug.yaml", overrides))
    tokenizers = list((tmp_path / "cache").glob("tokenizer-*"))
    datasets = list((tmp_path / "cache").glob("data-*"))
    assert len(tokenizers) == 1 and len(datasets) == 1 and summary["val_tokens"] > 0
    assert summary["sample"].startswith("ROMEO:")
    manifest = (datasets[0] / "manifest.json").stat().st_mtime
    again = train(load_config(CONFIGS / "debug.yaml", {**overrides, "logging.run_dir": str(tmp_path / "run2")}))
    assert (datasets[0] / "manifest.json").stat().st_mtime == manifest  # the cache was reused
    assert again["history"][0]["loss"] == summary["history"][0]["loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["single", "deepspeed", "fsdp2"])
def test_cuda_bf16_training_reports_mfu(tmp_path: Path, prepared: Path, backend: str) -> None:
    summary = train(config_for(prepared, tmp_path / backend, **{"train.backend": backend, "train.precision": "bf16",
                                                                "train.max_steps": 4, "train.device": "auto"}))
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert summary["peak_memory_mb"] > 0 and ("mfu" in summary or "H" not in torch.cuda.get_device_name())


def test_a_stop_signal_checkpoints_and_the_rerun_matches(tmp_path: Path, prepared: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import tlm.training.trainer as train_module

    straight = train(config_for(prepared, tmp_path / "straight", **{"train.max_steps": 8}))
    real_lr_at = train_module.lr_at

    def lr_at_with_preemption(step, *args):
        if step == 2:
            signal.raise_signal(signal.SIGUSR1)  # as Slurm does ahead of a time limit
        return real_lr_at(step, *args)

    monkeypatch.setattr(train_module, "lr_at", lr_at_with_preemption)
    first = train(config_for(prepared, tmp_path / "run", **{"train.max_steps": 8}))
    assert first["stopped"] == "SIGUSR1" and first["steps"] == 3 and not first["complete"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after the run
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)
    second = train(config_for(prepared, tmp_path / "run", **{"train.max_steps": 8}))
    losses = lambda s: [h["loss"] for h in s["history"] if "loss" in h]  # noqa: E731
    assert losses(first) + losses(second) == losses(straight)
    assert second["complete"] and second["val_loss"] == straight["val_loss"]


def test_a_stop_file_stops_every_rank(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stop_file = tmp_path / "stop"
    stop_file.touch()
    monkeypatch.setenv("TLM_STOP_FILE", str(stop_file))
    summary = train(config_for(prepared, tmp_path / "run", **{"train.max_steps": 8}))
    assert summary["steps"] == 1 and summary["stopped"] == f"stop file {stop_file}"
    assert (tmp_path / "run" / "checkpoints" / "step-00000001" / "COMPLETE").exists()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_activation_checkpointing_keeps_the_losses(tmp_path: Path, prepared: Path, compile: bool) -> None:
    losses = {}
    for mode in ("none", "selective", "full") if not compile else ("none", "full"):
        train(config_for(prepared, tmp_path / mode, **{"train.activation_checkpointing": mode, "train.max_steps": 4,
                                                        "train.precision": "fp32", "train.compile": compile,
                                                        "model.num_hidden_layers": 3, "eval.every": 0}))
        records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["none"]) == 4
    for mode in set(losses) - {"none"}:
        assert losses[mode] == pytest.approx(losses["none"], abs=1e-6, rel=0)


def test_recomputed_layers_follow_the_switch() -> None:
    model = TransformerLM(get_preset("debug", num_hidden_layers=4))
    calls = []
    import tlm.model.transformer as transformer

    original = transformer.checkpoint
    transformer.checkpoint = lambda fn, *args, **kwargs: calls.append(list(model.layers).index(fn)) or original(fn, *args, **kwargs)
    try:
        ids = torch.randint(0, 6400, (2, 8))
        for mode, expected in (("none", []), ("selective", [0, 2]), ("full", [0, 1, 2, 3])):
            calls.clear()
            model.activation_checkpointing = mode
            model(ids).sum().backward()
            assert calls == expected
        model.eval()
        calls.clear()
        model(ids)
        assert calls == []  # nothing to recompute without a backward
    finally:
        transformer.checkpoint = original
