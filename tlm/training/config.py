"""The one training configuration: sections of typed fields, command-line overrides, and its checks.

A recipe is a YAML file of sections (`model`, `data`, `optim`, `schedule`, `batch`, `train`, `eval`,
`checkpoint`, `logging`), read strictly (tlm.training.recipe); `--section.key=value` overrides any field. Every
key is checked against the dataclasses before anything starts, and the error names the key. Several recipes
compose key by key, a later file overriding an earlier one's keys. The config is resolved once: `model` is a
ModelConfig (the preset with its overrides), and the batch sizes a world size gives are one `BatchShape`.

Each field says, where it is defined, what a resume may do with it (tlm.training.resume_check):
- `identity(...)`: what the weights and the data mean; a change is refused, always (a new run is the way out);
- `on_purpose(...)`: run length, optimisation, cadence; changed only when named in --checkpoint.allow_change,
  then logged;
- `free(...)`: where things are and how they are shown; never compared.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlm_base.errors import ConfigError, TLMError
from tlm_base.schema import coerce
from tlm.model.config import ModelConfig, check_keys, get_preset
from tlm.training.recipe import MAX_CONFIG_MB, find_recipe, read_recipe
from tlm.training.sections import (
    RESUME, BatchSection, CheckpointSection, DataSection, EvalSection, LoggingSection, OptimSection, ScheduleSection,
    TrainSection,
    free, identity,
)

MAX_EPOCHS = 1e6
"""The most `train.epochs` may be: the step count it gives must be a finite whole number."""
SEED_LIMIT = 2**32
"""`train.seed` is in [0, 2**32): numpy's seeding takes any such number, torch's 64 bits take it plus the step
the trainer adds on another world size."""


@dataclass
class TrainConfig:
    name: str = free("run")
    model: ModelConfig = identity(factory=lambda: get_preset("tlm-26m"))
    """The model, resolved: a preset (`model.preset`) with the fields a recipe or flag sets."""
    data: DataSection = free(factory=DataSection)
    optim: OptimSection = free(factory=OptimSection)
    schedule: ScheduleSection = free(factory=ScheduleSection)
    batch: BatchSection = free(factory=BatchSection)
    train: TrainSection = free(factory=TrainSection)
    eval: EvalSection = free(factory=EvalSection)
    checkpoint: CheckpointSection = free(factory=CheckpointSection)
    logging: LoggingSection = free(factory=LoggingSection)
    model_keys: frozenset[str] = field(default=frozenset(), repr=False, compare=False, metadata={RESUME: "free"})
    """The model fields the recipe or the flags set (the tokenizer's special ids fill in the others)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("model_keys")
        return values

    def batch_shape(self, world_size: int) -> "BatchShape":
        """The batch sizes on `world_size` ranks; refuses batch sizes that do not divide."""
        micro = self.batch.micro_batch_size
        if self.batch.global_batch_tokens is not None:
            if self.batch.global_batch_tokens % self.data.seq_len:
                raise ConfigError(f"batch.global_batch_tokens ({self.batch.global_batch_tokens}) is not a multiple of "
                                  f"data.seq_len ({self.data.seq_len})")
            global_batch = self.batch.global_batch_tokens // self.data.seq_len
        else:
            global_batch = self.batch.global_batch_size or micro * world_size
        if global_batch % (micro * world_size):
            raise ConfigError(
                f"batch: global batch {global_batch} sequences is not a multiple of micro_batch_size ({micro}) x "
                f"world size ({world_size}); choose batch.global_batch_size = k * {micro * world_size}"
            )
        return BatchShape(micro, global_batch // (micro * world_size), world_size, self.data.seq_len)


@dataclass(frozen=True)
class BatchShape:
    """The batch sizes of a run on a given number of ranks, derived once from the config."""

    micro_batch_size: int
    """Sequences per rank per forward/backward."""
    accumulation_steps: int
    """Micro-batches per rank per optimizer step."""
    world_size: int
    seq_len: int

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step across all ranks."""
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def resume_kinds() -> dict[str, str]:
    """{dotted key: identity | on_purpose | free} for every field of every section (and `name`), from the fields'
    own definitions; `model` is identity as a whole (compared field by field, resolved)."""
    kinds = {}
    for section in dataclasses.fields(TrainConfig):
        if section.name == "model_keys":
            continue
        if dataclasses.is_dataclass(section.default_factory) and section.name != "model":
            kinds.update({f"{section.name}.{f.name}": f.metadata.get(RESUME) for f in dataclasses.fields(section.default_factory)})
        else:
            kinds[section.name] = section.metadata.get(RESUME)
    return kinds


NEW_RUN = ("start a new run instead (--name=NEW_NAME or --logging.run_dir=NEW_FOLDER, or --checkpoint.resume=none "
           "--checkpoint.overwrite=true to delete this one)")


def flatten_config(tree: dict[str, Any]) -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}, in JSON form (tuples as lists); the model section is left out
    (it is compared resolved, field by field)."""
    tree = json.loads(json.dumps(tree))
    flat: dict[str, Any] = {}
    for section, values in tree.items():
        if section == "model":
            continue
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat


def allowed_patterns(value: Any, known: set[str]) -> list[str]:
    """Parse --checkpoint.allow_change (a comma-separated string or a list) and check each key exists."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    patterns = [item.strip() for item in items if item.strip()]
    identity = {key for key, kind in resume_kinds().items() if kind == "identity"}
    for pattern in patterns:
        # a key of what the weights or the data mean, or a pattern naming only such keys (optim.* names optim.name
        # and keys a resume may change: allowed, and a changed optim.name is still refused when the configs compare)
        matched = {key for key in known | identity if fnmatch.fnmatchcase(key, pattern)}
        if (matched and matched <= identity) or pattern in identity or pattern.split(".")[0] == "model":
            raise ConfigError(f"checkpoint.allow_change: '{pattern}' changes what the weights or the data mean and "
                              f"cannot be changed on resume; {NEW_RUN}")
        if not matched & known:
            raise ConfigError(f"checkpoint.allow_change: '{pattern}' names no config key (e.g. optim.lr, train.max_steps, "
                              "schedule.*)")
    return patterns


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name not in ("name", "model", "model_keys")}


def _set(config: TrainConfig, dotted: str, value: Any, model: dict[str, Any]) -> None:
    """Set one dotted key, checked and coerced to its field's type; `model.*` keys are gathered in `model` (the
    ModelConfig is resolved from them once every key is read)."""
    parts = dotted.split(".")
    if parts[0] == "name" and len(parts) == 1:
        config.name = str(value)
        return
    if parts[0] == "model":
        if len(parts) != 2:
            raise ConfigError(f"config key '{dotted}': use model.<field>, e.g. model.num_key_value_heads")
        if parts[1] != "preset":  # checked now, with the model config's own field types
            check_keys({parts[1]: value}, "config section 'model'")
            value = coerce(value, typing.get_type_hints(ModelConfig)[parts[1]], dotted, ConfigError)
        model[parts[1]] = value
        return
    if parts[0] not in SECTIONS:
        hint = difflib.get_close_matches(parts[0], list(SECTIONS) + ["model", "name"], n=1)
        raise ConfigError(f"unknown config key '{dotted}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                          + f"; sections: name, model, {', '.join(SECTIONS)}")
    if len(parts) != 2:
        raise ConfigError(f"config key '{dotted}': expected {parts[0]}.<field>")
    section = getattr(config, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        hint = difflib.get_close_matches(parts[1], list(hints), n=1)
        raise ConfigError(f"unknown config key '{dotted}'" + (f" (did you mean '{parts[0]}.{hint[0]}'?)" if hint else "")
                          + f"; {parts[0]} has: {', '.join(hints)}")
    setattr(section, parts[1], coerce(value, hints[parts[1]], dotted, ConfigError))


def flatten(tree: dict[str, Any], prefix: str = "", where: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and (key in SECTIONS or key == "model") and not prefix:
            items = flatten(value, f"{dotted}.", where).items()
        else:
            items = [(dotted, value)]
        for name, item in items:
            if name in out:  # `train: {seed: 1}` and `train.seed: 2` in one file
                raise ConfigError(f"{where or 'config'}: key '{name}' is given twice (as a section's key and as a "
                                  "dotted key); keep one")
            out[name] = item
    return out


def load_config(path: str | Path | list[str | Path] | None = None, overrides: dict[str, Any] | None = None,
                max_mb: float = MAX_CONFIG_MB) -> TrainConfig:
    """A TrainConfig from YAML recipes (or the defaults) with dotted overrides, validated.

    `path` may be a list of recipes (`tlm train --config A --config B`): they compose key by key, each file
    overriding the keys an earlier one set (a key it does not give keeps the earlier value); the run is named
    after the last file unless a file sets `name`. The command-line overrides come last."""
    config = TrainConfig()
    paths = list(path) if isinstance(path, (list, tuple)) else [] if path is None else [path]
    if isinstance(path, (list, tuple)) and not paths:
        raise ConfigError("--config names no file")
    if paths:
        config.name = Path(paths[-1]).stem
    model: dict[str, Any] = {}
    paths = [find_recipe(p) for p in paths]
    for file in paths:
        tree = read_recipe(file, max_mb)
        for key, value in flatten(tree, where=f"config file '{file}'").items():
            try:
                _set(config, key, value, model)
            except ConfigError as e:
                raise ConfigError(f"{file}: {e}") from None
    for key, value in (overrides or {}).items():
        _set(config, key.replace("-", "_"), value, model)
        config.__dict__.setdefault("_overridden", set()).add(key.replace("-", "_"))  # given on the command line
    preset = model.pop("preset", "tlm-26m")
    config.model, config.model_keys = get_preset(preset, **model), frozenset(model)
    validate(config)
    return config


def check_muon(config: TrainConfig) -> None:
    """Muon's settings, and the backends it runs under: torch's Muon orthogonalises whole matrices, and DeepSpeed ZeRO
    1-3 hand the optimizer flat partitions of them; DeepSpeed's own ZeRO Muon is another algorithm (its Newton-Schulz
    iteration, its Adam, clipping after orthogonalisation), whose losses would not be the other backends'."""
    o, t = config.optim, config.train
    if t.backend == "deepspeed" and t.zero_stage > 0:
        raise ConfigError(f"optim.name=muon does not run under DeepSpeed ZeRO-{t.zero_stage} (ZeRO 1-3 give the optimizer "
                          "flat partitions, and torch's Muon orthogonalises whole matrices): add --train.backend=ddp, "
                          "--train.zero_stage=0, or --train.backend=fsdp2 to shard (it gathers each matrix)")
    if not (o.muon_lr > 0 and math.isfinite(o.muon_lr)):
        raise ConfigError(f"config key 'optim.muon_lr' must be positive, got {o.muon_lr}")
    if not 0 <= o.muon_momentum < 1:
        raise ConfigError(f"config key 'optim.muon_momentum' must be in [0, 1), got {o.muon_momentum}")
    if not 1 <= o.muon_ns_steps < 100:
        raise ConfigError(f"config key 'optim.muon_ns_steps' must be in [1, 100), got {o.muon_ns_steps}")
    decay = o.muon_weight_decay
    if decay is not None and not (decay >= 0 and math.isfinite(decay)):
        raise ConfigError(f"config key 'optim.muon_weight_decay' must be a finite number >= 0, got {decay}")


def validate(config: TrainConfig) -> None:
    """Refuse impossible settings before anything starts (the model config is built to check it too)."""
    model = config.model
    t = config.train
    for name in typing.get_type_hints(TrainConfig):  # every value, also those set in code
        section = getattr(config, name)
        if dataclasses.is_dataclass(section) and name != "model":  # the model config checks itself
            for key, annotation in typing.get_type_hints(type(section)).items():
                coerce(getattr(section, key), annotation, f"{name}.{key}", ConfigError)
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'train.zero_stage' must be 0, 1, 2 or 3, got {t.zero_stage}")
    if "train.zero_stage" in config.__dict__.get("_overridden", set()) and t.backend != "deepspeed":
        raise ConfigError(f"--train.zero_stage={t.zero_stage} is given but train.backend is {t.backend!r}: ZeRO is "
                          "DeepSpeed's; add --train.backend=deepspeed (or drop the stage)")
    positive = {"batch.micro_batch_size": config.batch.micro_batch_size, "data.seq_len": config.data.seq_len,
                "optim.lr": config.optim.lr, "train.epochs": t.epochs,
                "train.stop_grace_s": t.stop_grace_s, "train.max_skipped_steps": t.max_skipped_steps,
                "train.collective_timeout_s": t.collective_timeout_s}
    for key, value in positive.items():
        if not value > 0 or value == math.inf:  # NaN fails `> 0` too
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if t.epochs > MAX_EPOCHS:
        raise ConfigError(f"config key 'train.epochs' must be at most {MAX_EPOCHS:g}, got {t.epochs:g}; for a run of a "
                          "given length set train.max_steps")
    if not 0 <= t.seed < SEED_LIMIT:
        raise ConfigError(f"config key 'train.seed' must be in [0, 2**32), got {t.seed}")
    if config.data.seq_len > model.max_position_embeddings:
        raise ConfigError(f"data.seq_len {config.data.seq_len} exceeds the model's context of "
                          f"{model.max_position_embeddings} (model.max_position_embeddings); raise it with "
                          f"--model.max_position_embeddings={config.data.seq_len}, or train shorter rows")
    o = config.optim
    non_negative = {"optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip, "optim.eps": o.eps,
                    "schedule.warmup_steps": config.schedule.warmup_steps, "eval.every": config.eval.every,
                    "checkpoint.every": config.checkpoint.every, "checkpoint.keep_last": config.checkpoint.keep_last,
                    "data.prefetch": config.data.prefetch, "train.loss_chunk": t.loss_chunk}
    for key, value in non_negative.items():
        if not value >= 0 or value == math.inf:
            raise ConfigError(f"config key '{key}' must be a finite number >= 0, got {value}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {list(o.betas)}")
    if o.name == "muon":
        check_muon(config)
    for key, value in (("logging.log_every", config.logging.log_every), ("eval.max_batches", config.eval.max_batches),
                       ("eval.batch_size", config.eval.batch_size), ("train.stop_at", t.stop_at)):
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    allowed_patterns(config.checkpoint.allow_change, set(flatten_config(config.to_dict())))
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"config key 'train.max_steps' must be positive, got {t.max_steps}")
    if config.batch.global_batch_tokens is not None and config.batch.global_batch_size is not None:
        raise ConfigError("set batch.global_batch_size or batch.global_batch_tokens, not both")
    config.batch_shape(1)  # divisibility for one rank; the world size is checked at launch
    if not 0 <= config.schedule.min_lr_ratio <= 1 or not 0 < config.schedule.decay_fraction <= 1:
        raise ConfigError("schedule.min_lr_ratio must be in [0, 1] and schedule.decay_fraction in (0, 1]")
    if config.data.val_fraction is not None and not 0 < config.data.val_fraction < 1:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {config.data.val_fraction}")
    if config.data.val_fraction is not None and config.data.val_source is not None:
        raise ConfigError("set data.val_fraction (hold out part of data.source) or data.val_source, not both")
    if config.data.prepared is not None and config.data.source is not None:
        raise ConfigError("set data.prepared (a prepared folder) or data.source (raw text), not both")
    if t.document_masking != "none" and not config.data.pack:
        raise ConfigError(f"train.document_masking={t.document_masking} is for packed rows; with data.pack false each row "
                          "is one document already")
    if config.data.mix is not None:
        if config.data.prepared is not None or config.data.source is not None:
            raise ConfigError("set data.mix (prepared folders with weights) or data.prepared / data.source, not both")
        from data_pipeline.mixture import parse_mix

        try:
            parse_mix(config.data.mix)
        except TLMError as e:
            raise ConfigError(str(e)) from None


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as a YAML recipe (every section and key, defaults included): what --show_config prints,
    and a file `tlm train --config` reads back to the same config."""
    tree = json.loads(json.dumps(config.to_dict()))  # tuples as lists
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=120)
