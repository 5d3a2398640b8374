"""Generation from a model directory: checked prompts and sampling values, the context the model can take, and
the KV-cached decoder of tlm.model.generate (`tlm generate`)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from tlm_base.errors import CheckpointError, ConfigError
from tlm.model.config import ModelConfig

log = logging.getLogger("tlm")


def resolve_device(device: str) -> torch.device:
    """auto (CUDA when available), cpu, cuda, cuda:N."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."""
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise ConfigError(f"--dtype must be auto or one of {', '.join(choices)}, got {dtype!r}")
    return choices[dtype]


def check_int(flag: str, value: Any, low: int | None = None, below: int | None = None) -> None:
    """Refuse a flag value that is not an int (a bool, 1e8, a string), is below `low`, or not below `below`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if below is not None and value >= below:
        bound = f"2**{below.bit_length() - 1}" if below & (below - 1) == 0 else f"{below:,}"
        raise ConfigError(f"{flag} must be below {bound}, got {value}")


def check_number(flag: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    """Refuse a flag value that is not a finite number in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value!r}")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ConfigError(f"{flag} must be {span}, got {value}")


def check_context(config: ModelConfig, trained: int | None, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (its KV cache is allocated for all of it); warn past
    the length it was trained at, naming YaRN, which stretches RoPE to longer contexts."""
    total = prompt_tokens + max_new_tokens
    if total > config.max_position_embeddings:
        raise ConfigError(f"prompt ({prompt_tokens} tokens) + --max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                          f"model's context of {config.max_position_embeddings} (max_position_embeddings); lower "
                          "--max_new_tokens")
    scaling = config.rope_scaling
    usable = int(scaling["factor"] * scaling["original_max_position_embeddings"]) if scaling else trained
    if usable and total > usable and config.position_embedding == "rope":
        if scaling:
            log.warning("generating up to %d positions, past the %d YaRN stretches this model to: expect worse text",
                        total, usable)
        else:
            log.warning("generating up to %d positions, past the %d this model was trained at: expect worse text; "
                        "YaRN can stretch RoPE: --rope_scaling yarn:%d:%d", total, usable,
                        max(2, -(-total // usable)), usable)


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_prompt_ids(value: Any) -> list[list[int]]:
    """--prompt_ids: a list of token ids ([1, 2, 3]), a list of such lists for a batch, or one id; every id a whole
    number (not a bool, and not 1.5, which would silently become 1)."""
    if isinstance(value, bool) or not isinstance(value, (list, tuple, int)):
        raise ConfigError(f"--prompt_ids must be a list of token ids, e.g. '[1, 2, 3]', or a list of such lists for a "
                          f"batch, got {_shown(value)}")
    value = [value] if isinstance(value, int) else value
    if not value:
        raise ConfigError("--prompt_ids is an empty list: give at least one token id, e.g. '[1, 2, 3]'")
    rows = value if all(isinstance(v, (list, tuple)) for v in value) else [value]
    for i, row in enumerate(rows):
        for token in row:
            if isinstance(token, bool) or not isinstance(token, int):
                raise ConfigError(f"--prompt_ids: prompt {i} holds {_shown(token)}, not a token id (a whole number)")
    return [list(row) for row in rows]


def parse_prompts(value: Any) -> list[str]:
    """--prompt: a text or a non-empty list of texts, each valid UTF-8 (an argument of invalid bytes arrives as
    lone surrogates, which the tokenizer cannot take)."""
    texts = [str(p) for p in as_list(value)]
    if not texts:
        raise ConfigError("--prompt is an empty list: give a text, or a JSON list of texts")
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            which = "--prompt" if len(texts) == 1 else f"--prompt {i}"
            try:  # invalid bytes of the command line, kept by Python as surrogate escapes
                raw = text.encode("utf-8", "surrogateescape")
                offset = len(text[: e.start].encode("utf-8", "surrogateescape"))
                where = f"byte 0x{raw[offset]:02x} at offset {offset}"
            except UnicodeEncodeError:
                where = f"a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
            raise ConfigError(f"{which} is not valid UTF-8 text ({where}); pass the prompt in UTF-8") from None
    return texts


def complete(checkpoint: str, prompt: Any = None, prompt_ids: Any = None, max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, seed: int = 0, rope_scaling: Any = None,
             tokenizer: str | None = None, device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """Continue the prompts (texts, or token ids) of a model directory; the figures `tlm generate` prints.
    Every value is checked before the model is loaded."""
    from data_pipeline.tokenizer_files import has_tokenizer, load_tokenizer
    from tlm.checkpointing.model_dir import read_model_config, load_model_dir, read_model_meta
    from tlm.model.config import parse_rope_scaling
    from tlm.model.generate import generate

    check_int("--max_new_tokens", max_new_tokens, low=1)
    check_number("--temperature", temperature, low=0.0)
    check_int("--top_k", top_k, low=0)
    check_number("--top_p", top_p, low=0.0, high=1.0, low_open=True)
    check_int("--seed", seed, low=0, below=2**64)  # torch.Generator.manual_seed takes 64 bits
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    meta = read_model_meta(checkpoint)
    config = read_model_config(checkpoint)
    changes = {}
    if rope_scaling is not None:
        changes["rope_scaling"] = parse_rope_scaling(rope_scaling)
        config = config.replace(**changes)
    tokenizer_dir = tokenizer or (checkpoint if has_tokenizer(checkpoint) else None)
    tok = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if prompt_ids is not None:
        batch = parse_prompt_ids(prompt_ids)
    elif prompt is not None:
        texts = parse_prompts(prompt)
        if tok is None:
            raise CheckpointError(f"checkpoint '{checkpoint}' has no tokenizer: pass --tokenizer DIR, or token ids with "
                                  "--prompt_ids")
        batch = [enc.ids for enc in tok.encode_batch(texts)]
    else:
        raise ConfigError("give --prompt TEXT (or --prompt_ids IDS)")
    for i, ids in enumerate(batch):
        if not ids:
            raise ConfigError(f"prompt {i} encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} holds token id {bad[0]} outside the vocabulary (0..{config.vocab_size - 1})")
    check_context(config, meta.get("trained_seq_len"), max(len(ids) for ids in batch), max_new_tokens)

    model = load_model_dir(checkpoint, device=dev, dtype=torch_dtype, **changes)
    start = time.perf_counter()
    new_tokens = generate(model, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                          generator=torch.Generator(device=dev).manual_seed(seed))
    seconds = time.perf_counter() - start
    count = sum(len(t) for t in new_tokens)
    log.info("generated %d tokens in %.2f s (%.1f tokens/s)", count, seconds, count / max(seconds, 1e-9))
    return {"prompts": [tok.decode(p) for p in batch] if tok is not None else None,
            "completions": [tok.decode(t) for t in new_tokens] if tok is not None else None,
            "new_token_ids": new_tokens, "new_tokens": count, "seconds": round(seconds, 4),
            "tokens_per_s": round(count / max(seconds, 1e-9), 2), "rope_scaling": model.config.rope_scaling,
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
