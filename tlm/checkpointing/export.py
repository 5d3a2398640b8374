"""Export a tlm model directory as a Hugging Face `LlamaForCausalLM` folder.

tlm's parameter names are Llama's, so the export is a rename (`X` -> `model.X`, `lm_head` kept) plus a
`config.json`. Architectures Llama cannot express are refused: they would load without error in
transformers and silently compute something else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tlm.checkpointing.model_dir import CONFIG_NAME, load_config, read_weights
from tlm.model.config import ModelConfig
from data_pipeline.errors import ExportError
from data_pipeline.fileio import atomic_write_json, fsync_path, honour_umask
from data_pipeline.tokenizer_files import copy_tokenizer_files, has_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_incompatibilities(config: ModelConfig) -> list[str]:
    """Why `config` is not a Llama model (empty when it is)."""
    reasons = []
    if config.norm != "rmsnorm":
        reasons.append(f"norm='{config.norm}': LlamaForCausalLM always applies RMSNorm (LlamaRMSNorm)")
    if config.norm_position != "pre":
        reasons.append(
            "norm_position='post': Llama blocks normalise each sublayer's input (pre-norm) and end with a "
            "final norm; a post-norm model would load but compute something else"
        )
    if config.position_embedding != "rope":
        reasons.append(f"position_embedding='{config.position_embedding}': Llama always rotates q/k with RoPE")
    if config.mlp != "swiglu":
        reasons.append(f"mlp='{config.mlp}': LlamaMLP is gated (SwiGLU: gate_proj, up_proj, down_proj)")
    return reasons


def hf_name(name: str) -> str:
    """tlm parameter name -> LlamaForCausalLM's: everything but lm_head lives under `model.`."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def hf_config(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of the equivalent LlamaForCausalLM (legacy rope keys, read by transformers 4 and 5)."""
    max_positions = config.max_position_embeddings
    if config.rope_scaling is not None:
        # transformers warns when max_position_embeddings / original != factor; state the scaled length.
        rs = config.rope_scaling
        max_positions = int(rs["factor"] * rs["original_max_position_embeddings"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling is not None else None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write `checkpoint` (a tlm model directory) as a folder that `AutoModelForCausalLM` loads."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = load_config(checkpoint)
    reasons = llama_incompatibilities(config)
    if reasons:
        raise ExportError(
            "cannot export as LlamaForCausalLM: " + "; ".join(reasons) + ". Keep using the tlm model directory for this variant."
        )
    out = Path(out_dir)
    if (out / CONFIG_NAME).exists():
        raise ExportError(f"'{out}' holds a tlm model directory; export to another folder so that it is not overwritten")
    out.mkdir(parents=True, exist_ok=True)
    weights = {hf_name(name): t.to(DTYPES[dtype]).contiguous() for name, t in read_weights(checkpoint, config).items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    honour_umask(tmp)
    fsync_path(tmp)
    os.replace(tmp, out / "model.safetensors")
    if has_tokenizer(checkpoint):
        copy_tokenizer_files(Path(checkpoint), out)
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(config, k) is not None}
    if generation:
        atomic_write_json(out / "generation_config.json", generation)
    # config.json last: a folder without it is visibly incomplete, never half-loadable.
    atomic_write_json(out / "config.json", hf_config(config, dtype))
    return out
