"""The one training configuration: YAML + dataclasses, command-line overrides, and its checks.

A recipe is a YAML file of sections (`model`, `data`, `optim`, `schedule`, `batch`, `train`, `eval`,
`checkpoint`, `logging`); `--section.key=value` overrides any field. Every key is checked against the
dataclasses before anything starts, and the error names the key.

Recipes are read strictly (`read_recipe`): at most `MAX_CONFIG_MB` MiB (`--max_config_mb` raises it), UTF-8 (a
byte-order mark is fine), no key given twice, no YAML aliases (a few hundred bytes of nested aliases expand
into billions of values). Several recipes compose key by key, a later file overriding an earlier one's keys.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tlm_base.errors import ConfigError, TLMError
from tlm_base.schema import coerce
from tlm.model.config import ModelConfig, check_keys, get_preset

Backend = Literal["single", "ddp", "deepspeed", "fsdp2"]
Schedule = Literal["cosine", "constant", "wsd"]
Precision = Literal["bf16", "fp32"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
NanPolicy = Literal["skip", "stop", "off"]
BACKENDS = typing.get_args(Backend)
MAX_CONFIG_MB = 1.0
"""The most a config file may hold, in MiB (`tlm train --max_config_mb N` raises it)."""
MAX_EPOCHS = 1e6
"""The most `train.epochs` may be: the step count it gives must be a finite whole number."""
SEED_LIMIT = 2**32
"""`train.seed` is in [0, 2**32): numpy's seeding takes any such number, torch's 64 bits take it plus the step
the trainer adds on another world size."""


@dataclass
class DataSection:
    prepared: str | None = None
    """A folder written by `tlm prepare`. When None, `source` is prepared on first use under `cache_dir`."""
    mix: list[dict[str, Any]] | None = None
    """A weighted mixture of prepared folders instead of one: [{path: DIR, weight: W, name: optional}, ...]. One
    pass holds as many rows as the parts together, each part's share by weight (a small part repeats); every
    part must share the tokenizer, seq_len and packing. Validation loss is logged per part and overall."""
    source: Any = None
    """Raw text to prepare on first use (any `--data` of `tlm prepare`); None = the bundled demo corpus."""
    val_source: Any = None
    """Validation text for `source`; None with the bundled corpus = its held-out books."""
    tokenizer: str | None = None
    """Tokenizer folder; None = trained on `source` on first use under `cache_dir`."""
    val_fraction: float | None = None
    """Hold out this fraction of `source`'s documents for validation (chosen by a seeded hash of each document).
    None: `val_source`; with the bundled corpus its separate held-out books. Not with `val_source`; a
    `prepared` folder has its own split."""
    vocab_size: int = 6400
    """Vocabulary of a tokenizer trained on first use."""
    text_field: str = "text"
    """For `source`: the field (JSON) or column (Parquet, CSV) holding the text."""
    sample_by: Literal["document", "paragraph", "line"] = "document"
    """For text files of `source`: one document per file, per paragraph or per line."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad record of `source`: stop naming it, or count and skip it."""
    cache_dir: str = "runs/cache"
    """Where first-use tokenizers and prepared data are kept (shared by runs)."""
    seq_len: int = 512
    pack: bool = True
    prefetch: int = 4


@dataclass
class OptimSection:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_norms_and_embeddings: bool = True
    """False exempts norm weights and the (tied) embedding from weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""


@dataclass
class ScheduleSection:
    kind: Schedule = "cosine"
    """cosine: warmup then cosine to min_lr_ratio * lr; constant: warmup then lr; wsd: warmup, stable,
    then a linear decay to min_lr_ratio * lr over the last `decay_fraction` of the steps."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2


@dataclass
class BatchSection:
    micro_batch_size: int = 32
    """Sequences per rank per forward/backward."""
    global_batch_size: int | None = None
    """Sequences per optimizer step across all ranks; accumulation = global / (micro * world).
    None (and no global_batch_tokens) = micro_batch_size x world size, no accumulation."""
    global_batch_tokens: int | None = None
    """Alternative to global_batch_size, in tokens (must be a multiple of seq_len)."""


@dataclass
class TrainSection:
    backend: Backend = "deepspeed"
    """single | ddp | deepspeed | fsdp2 (single becomes ddp when launched on several ranks)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 (ds_configs/zero{stage}.json)."""
    precision: Precision = "bf16"
    max_steps: int | None = None
    """Optimizer steps; None = `epochs` over the training rows."""
    epochs: float = 1.0
    stop_at: int | None = None
    """Stop after this step with a checkpoint, keeping the schedule of the whole run (resume continues it)."""
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    """torch.compile the model (each decoder layer under FSDP2)."""
    fused_adamw: bool | None = None
    """torch's fused AdamW kernel; None = on CUDA only."""
    loss_chunk: int = 0
    """Compute the output projection + cross-entropy this many tokens at a time under checkpointing, so that
    the logits of the whole batch are never held (0 = all at once)."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute activations in backward instead of keeping them: full = every decoder layer keeps only its input;
    selective = every second layer (half the memory saving for half the recomputation). Same losses; `tlm plan`
    shows what each saves."""
    document_masking: Literal["none", "mask", "mask_positions"] = "none"
    """Packed rows: mask = a token attends only within its own document (a block-diagonal causal mask through
    SDPA); mask_positions = also restart positions at 0 in every document, as if each ran alone."""
    nan_policy: NanPolicy = "skip"
    """Non-finite gradients (NaN/Inf): skip (no update, counted and reported), stop (a diagnostic dump, no
    checkpoint of the bad state: the last good one is kept), or off (no check: saves one host sync a step)."""
    max_skipped_steps: int = 20
    """With nan_policy skip: stop as `stop` would after this many consecutive skipped steps."""
    stop_grace_s: float = 110.0
    """After SIGTERM / SIGUSR1 / the stop file: finish the step, checkpoint, exit; if that takes longer than
    this, exit anyway (status 143) before the scheduler's SIGKILL (Slurm signals 120 s ahead)."""


@dataclass
class EvalSection:
    every: int = 200
    """Validation every N steps (0 = only at the end)."""
    at_start: bool = False
    """Also validate the initial weights (step 0), as a baseline for the curve."""
    max_batches: int | None = 50
    """Batches per validation pass (None = the whole split)."""
    batch_size: int | None = None
    """Sequences per rank per validation batch (None = micro_batch_size)."""
    final_full: bool = False
    """Evaluate the whole validation split after the last step (max_batches then applies to the evaluations
    during training only): the final loss of a study, with its standard error across batches."""


@dataclass
class CheckpointSection:
    every: int = 500
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """How many checkpoints of the run's current line stay on disk (0 = all); checkpoints a rollback left in
    checkpoints/abandoned/ are never deleted."""
    resume: str = "auto"
    """auto: continue the checkpoint RUN/checkpoints/latest names (the first sound one down its line), if any;
    none: start a new run (refused in a folder that holds one, unless --checkpoint.overwrite=true); or a
    checkpoint folder: one of this run's (a rollback: the checkpoints after it move to checkpoints/abandoned/)
    or another folder's (this folder then starts a new run from it)."""
    overwrite: bool = False
    """With resume=none or another folder's checkpoint: delete the run this folder holds (its checkpoints,
    metrics.jsonl, summary.json) and start afresh there."""
    allow_change: Any = None
    """Keys a resumed run may change on purpose, comma-separated (e.g. optim.lr,train.max_steps or schedule.*):
    a resume refuses any change of the saved config (model, data, seq_len and seed never; run length,
    optimisation and cadence only when named here, and then logged). See tlm/resume_check.py."""


@dataclass
class LoggingSection:
    run_dir: str | None = None
    """Run folder (metrics.jsonl, checkpoints/); default runs/<name>."""
    log_every: int = 10
    progress: bool = True
    wandb: WandbMode = "auto"
    """auto: $WANDB_MODE when set (online, offline, disabled), else online when WANDB_API_KEY is set, else
    disabled; or online | offline | disabled."""
    wandb_project: str = "tlm"
    sample_prompt: str | None = "It was a dark and stormy night"
    """Printed with a generated continuation at the end of the run (None = no sample)."""


@dataclass
class TrainConfig:
    name: str = "run"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tlm-26m"})
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch: BatchSection = field(default_factory=BatchSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir or f"runs/{self.name}")

    def model_config(self) -> ModelConfig:
        values = dict(self.model)
        preset = values.pop("preset", "tlm-26m")
        return get_preset(preset, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def micro_steps(self, world_size: int) -> int:
        """Gradient accumulation steps for `world_size` ranks; refuses batch sizes that do not divide."""
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
        return global_batch // (micro * world_size)

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_steps(world_size) * self.batch.micro_batch_size * world_size


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name not in ("name", "model")}


def _set(config: TrainConfig, dotted: str, value: Any) -> None:
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
        config.model[parts[1]] = value
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


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` refers to an `&name` anchor, and a few hundred bytes of
    aliases of aliases expand into billions of values ("billion laughs"); a recipe has no need of them."""

    recipe = "config file"

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"{self.recipe}, line {event.start_mark.line + 1}: YAML alias '*{event.anchor}' refused: "
                              "config files may not use anchors and aliases (nested aliases can expand a small file "
                              "into billions of values); write the values out")
        return super().compose_node(parent, index)


def _refuse_duplicates(node: Any, recipe: str, where: str = "") -> None:
    """Refuse a key given twice in one mapping (YAML would keep the last one and drop the first silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = f"{where}.{key.value}" if where else str(key.value)
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    raise ConfigError(f"{recipe}: key '{name}' is given twice (lines {seen[key.tag, key.value]} and "
                                      f"{line}); YAML would keep the second and drop the first silently; keep one")
                seen[key.tag, key.value] = line
            _refuse_duplicates(value, recipe, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, recipe, f"{where}.{i}" if where else str(i))


def read_recipe(path: str | Path, max_mb: float = MAX_CONFIG_MB) -> dict[str, Any]:
    """The sections of a YAML recipe, read strictly: a regular file of at most `max_mb` MiB, UTF-8 (a byte-order
    mark is fine), no key twice, no aliases. Each refusal is one ConfigError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' " + ("is not a regular file" if file.exists() else "does not exist"))
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not 0 < max_mb < math.inf:
        raise ConfigError(f"--max_config_mb must be a positive number of MiB, got {max_mb!r}")
    limit = int(max_mb * 2**20)
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise ConfigError(f"config file '{path}' holds {max(size, len(data)):,} bytes, over {max_mb:g} MiB, the bound "
                          "on a config file; raise it with --max_config_mb N if it really is a recipe")
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} "
                          f"(line {line}); save it as UTF-8") from None
    loader = _StrictLoader(text)
    loader.recipe = f"config file '{path}'"
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicates(node, loader.recipe)
        tree = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"config file '{path}' is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree


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
    model_given = False
    for file in paths:
        tree = read_recipe(file, max_mb)
        if "model" in tree and not model_given:  # a recipe's model replaces the default preset, not merges into it
            config.model, model_given = {}, True
        for key, value in flatten(tree, where=f"config file '{file}'").items():
            try:
                _set(config, key, value)
            except ConfigError as e:
                raise ConfigError(f"{file}: {e}") from None
    for key, value in (overrides or {}).items():
        _set(config, key.replace("-", "_"), value)
        config.__dict__.setdefault("_overridden", set()).add(key.replace("-", "_"))  # given on the command line
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Refuse impossible settings before anything starts (the model config is built to check it too)."""
    model = config.model_config()
    t = config.train
    for name in typing.get_type_hints(TrainConfig):  # every value, also those set in code
        section = getattr(config, name)
        if dataclasses.is_dataclass(section):
            for key, annotation in typing.get_type_hints(type(section)).items():
                coerce(getattr(section, key), annotation, f"{name}.{key}", ConfigError)
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'train.zero_stage' must be 0, 1, 2 or 3, got {t.zero_stage}")
    if "train.zero_stage" in config.__dict__.get("_overridden", set()) and t.backend != "deepspeed":
        raise ConfigError(f"--train.zero_stage={t.zero_stage} is given but train.backend is {t.backend!r}: ZeRO is "
                          "DeepSpeed's; add --train.backend=deepspeed (or drop the stage)")
    positive = {"batch.micro_batch_size": config.batch.micro_batch_size, "data.seq_len": config.data.seq_len,
                "optim.lr": config.optim.lr, "train.epochs": t.epochs,
                "train.stop_grace_s": t.stop_grace_s, "train.max_skipped_steps": t.max_skipped_steps}
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
    for key, value in (("logging.log_every", config.logging.log_every), ("eval.max_batches", config.eval.max_batches),
                       ("eval.batch_size", config.eval.batch_size), ("train.stop_at", t.stop_at)):
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    from tlm.checkpointing.resume_check import allowed_patterns, flatten_config

    allowed_patterns(config.checkpoint.allow_change, set(flatten_config(config.to_dict())))
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"config key 'train.max_steps' must be positive, got {t.max_steps}")
    if config.batch.global_batch_tokens is not None and config.batch.global_batch_size is not None:
        raise ConfigError("set batch.global_batch_size or batch.global_batch_tokens, not both")
    config.micro_steps(1)  # divisibility for one rank; the world size is checked at launch
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
