"""The model directory: one self-describing folder that eval, generate, export (and the trainer) share.

    DIR/
      tlm_config.json     {"format": "tlm-model", "format_version": 1, "model": {ModelConfig}, ...}
      model.safetensors   weights under the model's own names (tied lm_head stored once)
      tokenizer.json ...  the tokenizer files, when the model has a tokenizer

The folder is built whole beside its final name and swapped in (tlm_base.folders.replace_folder), so a
crash never leaves a config that points at half-written weights, and a folder written over an older one
keeps nothing of it (no stale tokenizer). Loading checks the config's keys and every tensor's name, shape
and dtype (floating point), and names the first that disagrees.
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
from tlm_base.errors import CheckpointError, ConfigError
from tlm_base.fileio import atomic_write_json, check_output_folder, honour_umask, unknown_entries
from tlm_base.folders import replace_folder
from tlm_base.schema import Field, NonNegInt, PosInt, Schema, StrictInt, load_json_text, parse
from tlm.model.transformer import TransformerLM
from data_pipeline.tokenizer_files import TOKENIZER_FILES, copy_tokenizer_files, has_tokenizer

CONFIG_NAME = "tlm_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "tlm-model"
FORMAT_VERSION = 1
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, *TOKENIZER_FILES)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes weights may have
_DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "C64": "complex64"}  # the others, as torch names them


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
    """Write `model` (and tokenizer files, when given) as a tlm model directory; return its path. The folder is
    built beside `out_dir` and swapped in whole: whatever `out_dir` held before is replaced, never mixed with."""
    out = Path(out_dir)
    _check_tokenizer_dir(tokenizer_dir)
    with replace_folder(out, "model folder") as tmp:
        write_model_files(model, tmp, tokenizer_dir, extra)
    return out


def _check_tokenizer_dir(tokenizer_dir: str | os.PathLike | None) -> None:
    if tokenizer_dir is not None and not has_tokenizer(tokenizer_dir):
        raise CheckpointError(f"tokenizer folder '{tokenizer_dir}' has no tokenizer.json")


def write_model_files(model: TransformerLM, folder: Path, tokenizer_dir: str | os.PathLike | None = None,
                      extra: dict[str, Any] | None = None) -> None:
    """The files of a model directory, into `folder` (the temporary folder of `replace_folder`)."""
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), folder)  # from the old folder itself, when it is the target
    save_file(weights_for_save(model), str(folder / WEIGHTS_NAME),
              metadata={"format": "pt", "tlm_format": FORMAT, "tlm_format_version": str(FORMAT_VERSION)})
    honour_umask(folder / WEIGHTS_NAME)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tlm_version": tlm.__version__,
        "num_parameters": model.num_parameters(),
        "model": model.config.to_dict(),
        **(extra or {}),
    }
    atomic_write_json(folder / CONFIG_NAME, meta)


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


def read_model_config(model_dir: str | os.PathLike) -> ModelConfig:
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
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{weights_path}: tensor '{name}' has dtype {_DTYPE_NAMES.get(dtype, dtype)}, not a floating "
                        "point type (float32, bfloat16, float16): these are not weights tlm wrote; use another "
                        "checkpoint")
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
    config = read_model_config(model_dir)
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
    _check_init_target(out_path, overwrite, tokenizer)
    with replace_folder(out_path, "model folder", hint="wait for it to finish, or choose another --out") as tmp:
        _check_init_target(out_path, overwrite, tokenizer)  # again, now that it is locked
        torch.manual_seed(seed)
        model = TransformerLM(config)
        write_model_files(model, tmp, tokenizer, {"init": {"preset": preset, "seed": seed}})
    logging.getLogger("tlm").info("wrote %s: preset %s, %s parameters", out, preset, f"{model.num_parameters():,}")
    return {"out": str(out_path), "preset": preset, "num_parameters": model.num_parameters(), "config": config.to_dict()}


def _check_init_target(out: Path, overwrite: bool, tokenizer: str | None) -> None:
    """`tlm init` replaces its folder whole: a model (only with --overwrite), an empty folder, the folder of the
    --tokenizer itself (its files are copied in); never, without --overwrite, a folder holding anything else."""
    check_output_folder(out, "model folder", "--out")  # a name too long, a file above it, /proc
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"'{out}' is a file; --out must be a folder")
    if overwrite:
        return
    if (out / CONFIG_NAME).exists():
        raise CheckpointError(f"'{out}' already holds a model; pass --overwrite to replace it")
    own_tokenizer = tokenizer is not None and Path(tokenizer).resolve() == out.resolve()
    unknown = unknown_entries(out, MODEL_FILES if own_tokenizer else (WEIGHTS_NAME,))
    if unknown:
        shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise CheckpointError(f"'{out}' is not empty and not a model folder (it holds {shown}): tlm init replaces its "
                              "folder whole; choose a new or empty folder, or pass --overwrite to replace it and "
                              "everything in it")
