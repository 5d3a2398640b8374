"""Export a tlm model directory as a Hugging Face `LlamaForCausalLM` folder.

tlm's parameter names are Llama's, so the export is a rename (`X` -> `model.X`, `lm_head` kept) plus a
`config.json`. Architectures Llama cannot express are refused: they would load without error in
transformers and silently compute something else.

The folder is built beside OUT and swapped in whole under a lock (tlm_base.folders.replace_folder): an export
over an earlier one keeps nothing of it (no stale tokenizer), two exports into one folder never mix (the second
is refused, naming the first), and a kill leaves the earlier export whole. A folder that holds anything an export
does not write is replaced only with --overwrite.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tlm.checkpointing.model_dir import CONFIG_NAME, read_model_config, read_model_meta, read_weights
from tlm.model.config import ModelConfig
from tlm_base import faults
from tlm_base.errors import ExportError
from tlm_base.fileio import atomic_write_json, check_output_folder, honour_umask, unknown_entries
from tlm_base.folders import replace_folder
from data_pipeline.tokenizer_files import TOKENIZER_FILES, copy_tokenizer_files, has_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES)


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


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write `checkpoint` (a tlm model directory) as a folder that `AutoModelForCausalLM` loads; an earlier export
    there is replaced whole (see the module's docstring)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = read_model_config(checkpoint)
    reasons = llama_incompatibilities(config)
    if reasons:
        raise ExportError(
            "cannot export as LlamaForCausalLM: " + "; ".join(reasons) + ". Keep using the tlm model directory for this variant."
        )
    out = Path(out_dir)
    _check_out(Path(checkpoint), out, overwrite)
    weights = {hf_name(name): t.to(DTYPES[dtype]).contiguous() for name, t in read_weights(checkpoint, config).items()}
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(config, k) is not None}
    with replace_folder(out, "export folder", hint="wait for that export to finish, or choose another --out") as tmp:
        _check_out(Path(checkpoint), out, overwrite)  # again, now that it is locked
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        honour_umask(tmp / "model.safetensors")
        _fault_point()
        if has_tokenizer(checkpoint):
            copy_tokenizer_files(Path(checkpoint), tmp)
        if generation:
            atomic_write_json(tmp / "generation_config.json", generation)
        values = hf_config(config, dtype)
        trained = read_model_meta(checkpoint).get("trained_seq_len")
        if trained is not None:  # transformers keeps unknown keys; `tlm eval` of the export defaults to it, as of its source
            values["tlm_trained_seq_len"] = trained
        atomic_write_json(tmp / "config.json", values)
    return out


def _check_out(checkpoint: Path, out: Path, overwrite: bool) -> None:
    """OUT may be new, empty or an earlier export; anything else only with --overwrite; a tlm model never."""
    check_output_folder(out, "export folder", "--out")  # a name too long, a file above it, /proc
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out '{out}' is a file; it must be a folder")
    if (out / CONFIG_NAME).exists():
        raise ExportError(f"'{out}' holds a tlm model directory; export to another folder so that it is not "
                          "overwritten")
    if out.resolve() in checkpoint.resolve().parents:
        raise ExportError(f"'{out}' holds the checkpoint being exported ({checkpoint}); export to another folder")
    unknown = unknown_entries(out, EXPORT_FILES)
    if unknown and not overwrite:
        shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise ExportError(f"'{out}' holds files an export does not write ({shown}): tlm export replaces its folder "
                          "whole; choose a new or empty folder, or pass --overwrite to replace it and everything in it")


def _fault_point() -> None:
    """TLM_FAULT=kill_in_export@any / stall_in_export@any: a kill, or a minute's stall, half-way through the export
    (the weights written, the rest not) -- for the tests of a kill and of a second export racing this one."""
    active = faults.active()
    if faults.hit(active, "kill_in_export", 0, 0):
        faults.kill_self("in the middle of an export")
    if faults.hit(active, "stall_in_export", 0, 0):
        logging.getLogger("tlm").warning("fault injection: stalling the export for 60 s")
        time.sleep(60)
