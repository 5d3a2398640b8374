"""The model directory: one self-describing folder that eval, generate, export (and the trainer) share.

    DIR/
      tlm_config.json     {"format": "tlm-model", "format_version": 1, "model": {ModelConfig}, ...}
      model.safetensors   weights under the model's own names (tied lm_head stored once)
      tokenizer.json ...  the tokenizer files, when the model has a tokenizer

Files are written aside and renamed into place (weights first, config last), so a crash never leaves
a config that points at half-written weights. Loading checks the config's keys and every tensor's
name and shape, and names the first that disagrees.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tlm
from tlm.model.config import ModelConfig
from data_pipeline.errors import CheckpointError, ConfigError, TLMError
from data_pipeline.fileio import atomic_write_json, disk_full, fsync_path, honour_umask, is_disk_full, temp_path_beside
from data_pipeline.schema import Field, NonNegInt, PosInt, Schema, StrictInt, load_json_text, parse
from tlm.model.transformer import TransformerLM
from data_pipeline.tokenizer_files import copy_tokenizer_files

CONFIG_NAME = "tlm_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "tlm-model"
FORMAT_VERSION = 1


class ModelDirMeta(Schema):
    """tlm_config.json; its "model" object is checked by ModelConfig itself (types, ranges, a size bound)."""

    format: Literal["tlm-model"]
    format_version: Annotated[StrictInt, Field(ge=1, le=FORMAT_VERSION)]
    model: dict[str, Any]
    num_parameters: NonNegInt | None = None
    trained_steps: NonNegInt | None = None
    trained_seq_len: PosInt | None = None


def stored_state(model: TransformerLM) -> dict[str, torch.Tensor]:
    """The tensors a model directory stores: the state dict without a tied lm_head (it is embed_tokens)."""
    tied = model.config.tie_word_embeddings
    return {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}


def weights_for_save(model: TransformerLM) -> dict[str, torch.Tensor]:
    """`stored_state` as contiguous CPU tensors, ready for safetensors."""
    return {name: t.detach().to("cpu").contiguous() for name, t in stored_state(model).items()}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes a model directory of this config must hold (built on the meta device)."""
    with torch.device("meta"):
        model = TransformerLM(config)
    return {name: tuple(t.shape) for name, t in stored_state(model).items()}


def save_model_dir(
    model: TransformerLM,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and tokenizer files, when given) as a tlm model directory; return its path."""
    out = Path(out_dir)
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        copy_tokenizer_files(Path(tokenizer_dir), out)  # checks the folder before anything is written
    out.mkdir(parents=True, exist_ok=True)
    state = weights_for_save(model)
    tmp = temp_path_beside(out / WEIGHTS_NAME)
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "tlm_format": FORMAT, "tlm_format_version": str(FORMAT_VERSION)})
        honour_umask(tmp)
        fsync_path(tmp)
        os.replace(tmp, out / WEIGHTS_NAME)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, TLMError):
            raise disk_full(e, out / WEIGHTS_NAME) from e
        raise
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tlm_version": tlm.__version__,
        "num_parameters": model.num_parameters(),
        "model": model.config.to_dict(),
        **(extra or {}),
    }
    atomic_write_json(out / CONFIG_NAME, meta)
    return out


def read_model_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check `tlm_config.json`; explain what the folder is when it is not a tlm model directory."""
    path = Path(model_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a file; a tlm checkpoint is a directory holding {CONFIG_NAME}")
    config_path = path / CONFIG_NAME
    if not config_path.exists():
        if (path / "config.json").exists():
            raise CheckpointError(
                f"'{path}' holds config.json but no {CONFIG_NAME}: it looks like a Hugging Face model folder "
                "(tlm export writes those); tlm commands read tlm model directories (tlm init / tlm train write them)"
            )
        raise CheckpointError(f"'{path}' is not a tlm model directory: {CONFIG_NAME} is missing")
    meta = load_json_text(config_path, CheckpointError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{config_path}: not a tlm model config (expected \"format\": \"{FORMAT}\" and a \"model\" object)")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format_version {version} is newer than this tlm reads ({FORMAT_VERSION}); upgrade tlm"
        )
    parse(ModelDirMeta, meta, str(config_path), CheckpointError)
    return meta


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a model directory (unknown keys refused by name)."""
    meta = read_model_meta(model_dir)
    try:
        return ModelConfig.from_dict(meta["model"], source=str(Path(model_dir) / CONFIG_NAME))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_weights(model_dir: str | os.PathLike, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Load model.safetensors after checking every tensor name and shape against `config`."""
    weights_path = Path(model_dir) / WEIGHTS_NAME
    if not weights_path.exists():
        raise CheckpointError(f"'{model_dir}' has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    expected = expected_shapes(config)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            for name, shape in expected.items():
                if name not in found:
                    raise CheckpointError(f"{weights_path}: tensor '{name}' is missing (the config expects shape {shape})")
                if found[name] != shape:
                    raise CheckpointError(
                        f"{weights_path}: tensor '{name}' has shape {found[name]} but the config expects {shape}; "
                        "the weights belong to a different model than its config"
                    )
            for name in found:
                if name not in expected:
                    raise CheckpointError(f"{weights_path}: unexpected tensor '{name}' (not part of this model config)")
            weights = {name: f.get_tensor(name) for name in expected}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own types for truncated or foreign files
        raise CheckpointError(f"{weights_path}: cannot read weights ({type(e).__name__}: {e})") from None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{weights_path}: tensor '{name}' holds {bad} NaN/Inf values: these weights would "
                                  "only produce garbage; use an earlier checkpoint")
    return weights


def load_model_dir(
    model_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **config_changes: Any,
) -> TransformerLM:
    """Build the model a directory describes and load its weights (in eval mode).

    `config_changes` may alter fields that do not change any tensor shape (e.g. `rope_scaling`, to
    switch YaRN on at inference); a change that does is caught by the shape check.
    """
    config = load_config(model_dir)
    if config_changes:
        try:
            config = config.replace(**config_changes)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    weights = read_weights(model_dir, config)
    with torch.device("meta"):
        model = TransformerLM(config)
    model = model.to_empty(device=device)
    if dtype is not None:
        model = model.to(dtype)
    model.load_state_dict(weights, strict=False, assign=False)
    if config.tie_word_embeddings:  # to_empty gives each parameter its own storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()



def init_model_dir(out: str, preset: str = "tlm-26m", tokenizer: str | None = None, seed: int = 0,
                   overwrite: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`tlm init`: a freshly initialised model directory from a preset, overrides and a tokenizer's special ids."""
    import logging

    from data_pipeline.tokenizer_files import load_tokenizer, special_token_ids
    from tlm.model.config import get_preset, parse_rope_scaling

    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    if "rope_scaling" in overrides:
        overrides["rope_scaling"] = parse_rope_scaling(overrides["rope_scaling"])
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        for key, value in special_token_ids(tokenizer, tok).items():
            overrides.setdefault(key, value)
    config = get_preset(preset, **overrides)
    if tok is not None and tok.get_vocab_size() > config.vocab_size:
        raise ConfigError(f"tokenizer '{tokenizer}' has {tok.get_vocab_size()} tokens but vocab_size is {config.vocab_size}")
    out_path = Path(out)
    if (out_path / CONFIG_NAME).exists() and not overwrite:
        raise CheckpointError(f"'{out}' already holds a model; pass --overwrite to replace it")
    torch.manual_seed(seed)
    model = TransformerLM(config)
    save_model_dir(model, out_path, tokenizer_dir=tokenizer, extra={"init": {"preset": preset, "seed": seed}})
    logging.getLogger("tlm").info("wrote %s: preset %s, %s parameters", out, preset, f"{model.num_parameters():,}")
    return {"out": str(out_path), "preset": preset, "num_parameters": model.num_parameters(), "config": config.to_dict()}
