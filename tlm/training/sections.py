"""The sections of the training config, one dataclass each, every field with its default, a docstring where the
name does not say enough, and what a resume may do with it (tlm.training.config explains the three kinds)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["single", "ddp", "deepspeed", "fsdp2"]
Schedule = Literal["cosine", "constant", "wsd"]
Precision = Literal["bf16", "fp32"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
NanPolicy = Literal["skip", "stop", "off"]
Optimizer = Literal["adamw", "muon"]
BACKENDS = typing.get_args(Backend)
RESUME = "resume"  # the field metadata key saying what a resume may do with a field


def identity(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field that says what the weights or the data mean: a resume never changes it."""
    return field(default=default, default_factory=factory, metadata={RESUME: "identity"})


def on_purpose(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field a resume changes only when named in --checkpoint.allow_change (the change is then logged)."""
    return field(default=default, default_factory=factory, metadata={RESUME: "on_purpose"})


def free(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field a resume may change without a word: it moves nothing the run computes."""
    return field(default=default, default_factory=factory, metadata={RESUME: "free"})


@dataclass
class DataSection:
    prepared: str | None = free(None)
    """A folder written by `tlm prepare`. When None, `source` is prepared on first use under `cache_dir`."""
    mix: list[dict[str, Any]] | None = free(None)
    """A weighted mixture of prepared folders instead of one: [{path: DIR, weight: W, name: optional}, ...]. One
    pass holds as many rows as the parts together, each part's share by weight (a small part repeats); every
    part must share the tokenizer, seq_len and packing. Validation loss is logged per part and overall."""
    source: Any = free(None)
    """Raw text to prepare on first use (any `--data` of `tlm prepare`); None = the bundled demo corpus."""
    val_source: Any = free(None)
    """Validation text for `source`; None with the bundled corpus = its held-out books."""
    tokenizer: str | None = free(None)
    """Tokenizer folder; None = trained on `source` on first use under `cache_dir`."""
    val_fraction: float | None = free(None)
    """Hold out this fraction of `source`'s documents for validation (chosen by a seeded hash of each document).
    None: `val_source`; with the bundled corpus its separate held-out books. Not with `val_source`; a
    `prepared` folder has its own split."""
    vocab_size: int = free(6400)
    """Vocabulary of a tokenizer trained on first use."""
    text_field: str = free("text")
    """For `source`: the field (JSON) or column (Parquet, CSV) holding the text."""
    sample_by: Literal["document", "paragraph", "line"] = free("document")
    """For text files of `source`: one document per file, per paragraph or per line."""
    on_error: Literal["raise", "skip"] = free("raise")
    """A bad record of `source`: stop naming it, or count and skip it."""
    cache_dir: str = free("runs/cache")
    """Where first-use tokenizers and prepared data are kept (shared by runs)."""
    seq_len: int = identity(512)
    pack: bool = identity(True)
    prefetch: int = free(4)


@dataclass
class OptimSection:
    name: Optimizer = identity("adamw")
    """adamw: torch's AdamW for every parameter. muon: torch's Muon (orthogonalised momentum) for the hidden weight
    matrices (attention and MLP projections) at `muon_lr`, AdamW at `lr` for the rest (embeddings, tied lm_head,
    norm weights); runs under single, ddp, deepspeed ZeRO-0 and fsdp2 (each matrix gathered to be orthogonalised),
    not under ZeRO 1-3. A resume keeps the optimizer its checkpoint holds the state of."""
    lr: float = on_purpose(5e-4)
    betas: tuple[float, float] = on_purpose((0.9, 0.999))
    eps: float = on_purpose(1e-8)
    weight_decay: float = on_purpose(0.01)
    decay_norms_and_embeddings: bool = on_purpose(True)
    """False exempts norm weights and the (tied) embedding from weight decay."""
    grad_clip: float = on_purpose(1.0)
    """Clip the global gradient norm to this (0 = off)."""
    muon_lr: float = on_purpose(0.02)
    """Muon's peak learning rate (the schedule scales it as it scales `lr`). 0.02 with momentum 0.95, Nesterov and 5
    Newton-Schulz steps: Keller Jordan's Muon reference and nanochat's matrix learning rate."""
    muon_momentum: float = on_purpose(0.95)
    muon_nesterov: bool = on_purpose(True)
    muon_ns_steps: int = on_purpose(5)
    """Newton-Schulz iterations of the orthogonalisation (torch's default coefficients)."""
    muon_adjust_lr_fn: Literal["original", "match_rms_adamw"] = on_purpose("original")
    """torch.optim.Muon's learning-rate adjustment per matrix shape: original = sqrt(max(1, rows / cols)) (Keller
    Jordan's); match_rms_adamw = 0.2 sqrt(max(rows, cols)) (Moonshot's, to reuse AdamW's lr and weight decay)."""
    muon_weight_decay: float | None = on_purpose(None)
    """Decoupled weight decay of the Muon matrices (x the Muon lr, as torch applies it); None = weight_decay."""


@dataclass
class ScheduleSection:
    kind: Schedule = on_purpose("cosine")
    """cosine: warmup then cosine to min_lr_ratio * lr; constant: warmup then lr; wsd: warmup, stable,
    then a linear decay to min_lr_ratio * lr over the last `decay_fraction` of the steps."""
    warmup_steps: int = on_purpose(0)
    min_lr_ratio: float = on_purpose(0.1)
    decay_fraction: float = on_purpose(0.2)


@dataclass
class BatchSection:
    micro_batch_size: int = on_purpose(32)
    """Sequences per rank per forward/backward."""
    global_batch_size: int | None = on_purpose(None)
    """Sequences per optimizer step across all ranks; accumulation = global / (micro * world).
    None (and no global_batch_tokens) = micro_batch_size x world size, no accumulation."""
    global_batch_tokens: int | None = on_purpose(None)
    """Alternative to global_batch_size, in tokens (must be a multiple of seq_len)."""


@dataclass
class TrainSection:
    backend: Backend = free("deepspeed")
    """single | ddp | deepspeed | fsdp2 (single becomes ddp when launched on several ranks)."""
    zero_stage: int = free(1)
    """DeepSpeed ZeRO stage 0-3 (ds_configs/zero{stage}.json)."""
    precision: Precision = on_purpose("bf16")
    max_steps: int | None = on_purpose(None)
    """Optimizer steps; None = `epochs` over the training rows."""
    epochs: float = on_purpose(1.0)
    stop_at: int | None = free(None)
    """Stop after this step with a checkpoint, keeping the schedule of the whole run (resume continues it)."""
    seed: int = identity(0)
    device: str = free("auto")
    compile: bool = on_purpose(False)
    """torch.compile the model (each decoder layer under FSDP2)."""
    fused_adamw: bool | None = on_purpose(None)
    """torch's fused AdamW kernel; None = on CUDA only."""
    loss_chunk: int = on_purpose(0)
    """Compute the output projection + cross-entropy this many tokens at a time under checkpointing, so that
    the logits of the whole batch are never held (0 = all at once)."""
    activation_checkpointing: Literal["none", "selective", "full"] = free("none")
    """Recompute activations in backward instead of keeping them: full = every decoder layer keeps only its input;
    selective = every second layer (half the memory saving for half the recomputation). Same losses; `tlm plan`
    shows what each saves."""
    document_masking: Literal["none", "mask", "mask_positions"] = on_purpose("none")
    """Packed rows: mask = a token attends only within its own document (a block-diagonal causal mask through
    SDPA); mask_positions = also restart positions at 0 in every document, as if each ran alone."""
    nan_policy: NanPolicy = on_purpose("skip")
    """Non-finite gradients (NaN/Inf): skip (no update, counted and reported), stop (a diagnostic dump, no
    checkpoint of the bad state: the last good one is kept), or off (no check: saves one host sync a step)."""
    max_skipped_steps: int = on_purpose(20)
    """With nan_policy skip: stop as `stop` would after this many consecutive skipped steps."""
    stop_grace_s: float = free(110.0)
    """After SIGTERM / SIGUSR1 / the stop file: finish the step, checkpoint, exit; if that takes longer than
    this, exit anyway (status 143) before the scheduler's SIGKILL (Slurm signals 120 s ahead)."""
    collective_timeout_s: float = free(300.0)
    """Once training starts, the longest any rank waits in a collective for the others (a rank that died without
    a word, a hung device, a node whose link went down): past it, every waiting rank ends with one line naming
    itself and the cause. Setup (data preparation, conversions) keeps torch's own, longer limit."""


@dataclass
class EvalSection:
    every: int = on_purpose(200)
    """Validation every N steps (0 = only at the end)."""
    at_start: bool = on_purpose(False)
    """Also validate the initial weights (step 0), as a baseline for the curve."""
    max_batches: int | None = on_purpose(50)
    """Batches per validation pass, in all (None = the whole split): the first max_batches x batch_size rows of the
    split, whatever the number of ranks (each batch goes to one rank), so that the figures do not depend on it."""
    batch_size: int | None = on_purpose(None)
    """Sequences per validation batch (None = micro_batch_size)."""
    final_full: bool = on_purpose(False)
    """Evaluate the whole validation split after the last step (max_batches then applies to the evaluations
    during training only): the final loss of a study, with its standard error across batches."""


@dataclass
class CheckpointSection:
    every: int = on_purpose(500)
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = free(2)
    """How many checkpoints of the run's current line stay on disk (0 = all); checkpoints a rollback left in
    checkpoints/abandoned/ are never deleted."""
    resume: str = free("auto")
    """auto: continue the checkpoint RUN/checkpoints/latest names (the first sound one down its line), if any;
    none: start a new run (refused in a folder that holds one, unless --checkpoint.overwrite=true); or a
    checkpoint folder: one of this run's (a rollback: the checkpoints after it move to checkpoints/abandoned/)
    or another folder's (this folder then starts a new run from it)."""
    overwrite: bool = free(False)
    """With resume=none or another folder's checkpoint: delete the run this folder holds (its checkpoints,
    metrics.jsonl, summary.json) and start afresh there."""
    allow_change: Any = free(None)
    """Keys a resumed run may change on purpose, comma-separated (e.g. optim.lr,train.max_steps or schedule.*):
    a resume refuses any change of the saved config (model, data, seq_len and seed never; run length,
    optimisation and cadence only when named here, and then logged). See tlm/training/resume_check.py."""


@dataclass
class LoggingSection:
    run_dir: str | None = free(None)
    """Run folder (metrics.jsonl, checkpoints/); default runs/<name>."""
    log_every: int = on_purpose(10)
    progress: bool = free(True)
    wandb: WandbMode = free("auto")
    """auto: $WANDB_MODE when set (online, offline, disabled), else online when WANDB_API_KEY is set, else
    disabled; or online | offline | disabled."""
    wandb_project: str = free("tlm")
    sample_prompt: str | None = free("It was a dark and stormy night")
    """Printed with a generated continuation at the end of the run (None = no sample)."""
    curves: bool = free(True)
    """Redraw RUN/curves.png (training and validation loss against tokens, learning rate) at each evaluation."""
