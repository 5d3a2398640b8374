"""Model configuration: transformers' Llama field names, the ablation switches, and named presets.

A preset is a dict of the fields it sets explicitly; everything it leaves out is derived in
`ModelConfig.__post_init__`. Overrides are applied to that dict *before* derivation, so that
`get_preset("tlm-26m", mlp="silu")` gets the SiLU default `intermediate_size = 4 * hidden_size`
instead of inheriting SwiGLU's 1408.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from tlm_base.errors import ConfigError
from tlm_base.schema import coerce

Norm = Literal["rmsnorm", "layernorm", "none"]
NormPosition = Literal["pre", "post"]
PositionEmbedding = Literal["rope", "nope"]
Mlp = Literal["swiglu", "silu"]
NORMS, NORM_POSITIONS = typing.get_args(Norm), typing.get_args(NormPosition)
POSITION_EMBEDDINGS, MLPS = typing.get_args(PositionEmbedding), typing.get_args(Mlp)

# Keys of a YaRN `rope_scaling` dict, with Hugging Face's meaning (`_compute_yarn_parameters`).
YARN_REQUIRED = ("factor", "original_max_position_embeddings")
YARN_OPTIONAL = ("rope_type", "type", "beta_fast", "beta_slow", "attention_factor", "truncate")


@dataclass
class ModelConfig:
    """Shape and architecture of a TransformerLM. Field names follow transformers' `LlamaConfig`."""

    vocab_size: int = 6400
    """Number of token ids the embedding and the output layer cover."""
    hidden_size: int = 512
    """Width of the residual stream (d_model)."""
    intermediate_size: int | None = None
    """Hidden width of the MLP. Derived when None: SwiGLU uses 8/3 * hidden rounded up to a multiple
    of 64 (1408 for 512, as Llama and the original model do), SiLU uses 4 * hidden."""
    num_hidden_layers: int = 8
    """Number of decoder blocks."""
    num_attention_heads: int = 8
    """Number of query heads."""
    num_key_value_heads: int = 2
    """Number of key/value heads (GQA): 1 = multi-query, num_attention_heads = multi-head."""
    head_dim: int | None = None
    """Width of one attention head; derived as hidden_size // num_attention_heads when None."""
    max_position_embeddings: int = 32768
    """Longest context the model advertises (written to exported configs). RoPE itself has no table,
    so this is not a hard limit; YaRN's `original_max_position_embeddings` is the trained length."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the normalisation layers (RMSNorm and LayerNorm alike)."""
    rope_theta: float = 1e6
    """RoPE base: a large theta keeps low frequencies slow, which helps longer contexts."""
    rope_scaling: dict[str, Any] | None = None
    """None, or YaRN: {"rope_type": "yarn", "factor", "original_max_position_embeddings",
    optional "beta_fast" (32), "beta_slow" (1), "attention_factor" (0.1 ln(factor) + 1), "truncate" (True)}."""
    tie_word_embeddings: bool = True
    """Share the input embedding matrix with the output projection (lm_head)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight init (see TransformerLM._init_weights)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id, taken from the tokenizer when one is attached."""
    eos_token_id: int | None = None
    """End-of-text id: generation stops on it. Taken from the tokenizer when one is attached."""
    pad_token_id: int | None = None
    """Padding id used for batched prompts."""
    norm: Norm = "rmsnorm"
    """Ablation: 'rmsnorm' | 'layernorm' | 'none' (identity)."""
    norm_position: NormPosition = "pre"
    """Ablation: 'pre' (normalise each sublayer's input, Llama) | 'post' (normalise after the residual
    add, as in the original Transformer)."""
    position_embedding: PositionEmbedding = "rope"
    """Ablation: 'rope' | 'nope' (no positional signal except causal masking)."""
    mlp: Mlp = "swiglu"
    """Ablation: 'swiglu' (down(silu(gate(x)) * up(x))) | 'silu' (down(silu(up(x))))."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size, self.mlp)
        self._validate()

    def _check_types(self) -> None:
        """Every field through the one coercion path of configs (tlm_base.schema.coerce): strict types,
        choices from the Literal annotations, 'true'/'false' and '1e-5' spellings from a command line."""
        for name, annotation in typing.get_type_hints(ModelConfig).items():
            setattr(self, name, coerce(getattr(self, name), annotation, name, ConfigError, prefix="model config key"))

    def _validate(self) -> None:
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model config key '{key}' must be positive, got {getattr(self, key)}")
        for key, low, inclusive in (("rms_norm_eps", 0.0, False), ("rope_theta", 0.0, False),
                                    ("initializer_range", 0.0, True)):
            value = getattr(self, key)
            if not math.isfinite(value) or value < low or (value == low and not inclusive):
                raise ConfigError(f"model config key '{key}' must be a finite number {'>=' if inclusive else '>'} {low:g}, "
                                  f"got {value!r}")
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ConfigError(f"model config key 'max_position_embeddings' must be at most {MAX_POSITIONS:,}, "
                              f"got {self.max_position_embeddings:,}")
        parameters = estimate_parameters(self)
        if parameters > MAX_PARAMETERS:  # checked before anything is allocated
            raise ConfigError(
                f"this model config describes {parameters:.3g} parameters (num_hidden_layers {self.num_hidden_layers:,} x "
                f"hidden_size {self.hidden_size:,}, intermediate_size {self.intermediate_size:,}, vocab_size "
                f"{self.vocab_size:,}), over the {MAX_PARAMETERS:.0e} tlm builds; check those fields"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {self.head_dim}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"model config key '{key}' = {value} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.rope_scaling is not None:
            if self.position_embedding != "rope":
                raise ConfigError("rope_scaling is set but position_embedding is 'nope': YaRN scales RoPE only")
            self.rope_scaling = validate_rope_scaling(self.rope_scaling)

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields, derived ones resolved: enough to rebuild the exact same model."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model config") -> "ModelConfig":
        """Build from a dict, refusing unknown keys by name (with a suggestion for typos)."""
        check_keys(values, source)
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied and everything re-validated (derived fields kept as resolved)."""
        check_keys(changes, "override")
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def check_keys(values: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the first key that is not a ModelConfig field."""
    known = field_names()
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown model config key '{key}'{suggestion}; known keys: {', '.join(known)}")


# Bounds checked before a model is built from a config (which may come from a file): far above any model
# tlm is meant for, low enough that a corrupt or hostile number cannot make it allocate until killed.
MAX_PARAMETERS = 10**11
MAX_POSITIONS = 1 << 24


def estimate_parameters(config: "ModelConfig") -> int:
    """Parameters of the model `config` describes, by arithmetic (nothing built)."""
    h, d = config.hidden_size, config.head_dim or 0
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = (3 if config.mlp == "swiglu" else 2) * h * (config.intermediate_size or 0)
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * (attention + mlp + 2 * h) + h


def default_intermediate_size(hidden_size: int, mlp: str) -> int:
    """SwiGLU: 2/3 of 4*hidden (same parameters as a 4x two-matrix MLP), rounded up to 64. SiLU: 4*hidden."""
    if mlp == "swiglu":
        return 64 * math.ceil(8 * hidden_size / 3 / 64)
    return 4 * hidden_size


def validate_rope_scaling(rope_scaling: dict[str, Any]) -> dict[str, Any]:
    """Check a YaRN dict and return it normalised with `rope_type: "yarn"` first."""
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"rope_scaling must be a dict or None, got {rope_scaling!r}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "yarn"))
    if kind != "yarn":
        raise ConfigError(f"rope_scaling type '{kind}' is not supported; tlm implements 'yarn'")
    for key in rope_scaling:
        if key not in YARN_REQUIRED + YARN_OPTIONAL:
            raise ConfigError(
                f"unknown rope_scaling key '{key}'; YaRN takes {', '.join(YARN_REQUIRED + YARN_OPTIONAL[2:])}"
            )
    for key in YARN_REQUIRED:
        if key not in rope_scaling:
            raise ConfigError(f"rope_scaling (yarn) needs '{key}'")
    out: dict[str, Any] = {"rope_type": "yarn"}
    out.update({k: v for k, v in rope_scaling.items() if k not in ("rope_type", "type")})
    if isinstance(out["factor"], bool) or not isinstance(out["factor"], (int, float)) or not math.isfinite(out["factor"]) \
            or out["factor"] < 1:
        raise ConfigError(f"rope_scaling 'factor' must be a number >= 1, got {out['factor']!r}")
    original = out["original_max_position_embeddings"]
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ConfigError(
            "rope_scaling 'original_max_position_embeddings' must be a positive int (the trained context), "
            f"got {out['original_max_position_embeddings']!r}"
        )
    for key in ("beta_fast", "beta_slow", "attention_factor"):
        if key in out and out[key] is not None and (isinstance(out[key], bool) or not isinstance(out[key], (int, float))
                                                    or not math.isfinite(out[key]) or out[key] <= 0):
            raise ConfigError(f"rope_scaling '{key}' must be a finite positive number, got {out[key]!r}")
    if "truncate" in out and not isinstance(out["truncate"], bool):
        raise ConfigError(f"rope_scaling 'truncate' must be true or false, got {out['truncate']!r}")
    return out


def parse_rope_scaling(value: Any) -> dict[str, Any] | None:
    """Read a command-line `--rope_scaling`: none | a dict | JSON | 'yarn:FACTOR:ORIGINAL_CONTEXT'."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, dict):
        return validate_rope_scaling(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                return validate_rope_scaling(json.loads(text))
            except json.JSONDecodeError as e:
                raise ConfigError(f"--rope_scaling is not valid JSON: {e}") from None
        parts = text.split(":")
        if parts[0] == "yarn" and len(parts) == 3:
            try:
                factor, original = float(parts[1]), int(parts[2])
            except ValueError:
                raise ConfigError(f"--rope_scaling '{value}': expected yarn:FACTOR:ORIGINAL_CONTEXT, e.g. yarn:4:512") from None
            return validate_rope_scaling({"factor": factor, "original_max_position_embeddings": original})
    raise ConfigError(
        f"--rope_scaling {value!r}: use none, yarn:FACTOR:ORIGINAL_CONTEXT (e.g. yarn:4:512), or a JSON dict"
    )


# Named presets: only what differs from the ModelConfig defaults (which are the tlm-26m baseline).
PRESETS: dict[str, dict[str, Any]] = {
    # The 26M baseline: vocab 6400, 8 layers, d_model 512, 8 query / 2 KV heads, SwiGLU 1408,
    # RMSNorm 1e-5, RoPE theta 1e6, tied embeddings, no biases: 25,829,888 parameters.
    "tlm-26m": {},
    # MiniMind2's 104M shape: d_model 768, 16 layers, 8 query / 2 KV heads, SwiGLU 2048 (8/3 x 768 rounded up to
    # 64, the rule that gives the baseline's 1408): 104,030,976 parameters.
    "minimind2-104m": {"hidden_size": 768, "num_hidden_layers": 16, "intermediate_size": 2048},
    # GPT-2 small's shape (d_model 768, 12 layers, 12 heads, all of them KV heads, a 4 x 768 MLP's parameters as
    # SwiGLU 2048) with this vocabulary: 89,869,056 parameters (GPT-2's 124M holds a 50,257-token embedding).
    "gpt2-small-shape": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "num_key_value_heads": 12, "intermediate_size": 2048},
    # Llama-3.2-1B's shape (d_model 2048, 16 layers, 32 query / 8 KV heads, SwiGLU 8192, RoPE theta 5e5, tied)
    # with this vocabulary: 986,253,312 parameters.
    "llama-1b-shape": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "intermediate_size": 8192, "rope_theta": 500000.0,
                       "max_position_embeddings": 8192},
    # Tiny, for tests and smoke runs: a training step takes milliseconds on one CPU core.
    "debug": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    },
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied before derived fields are computed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    return ModelConfig.from_dict(values, source=f"preset '{name}'")
