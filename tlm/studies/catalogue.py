"""The catalogue of ablation studies: each variant is a config override of one base recipe (configs/ablations/
SCALE.yaml), run for N seeds; the decision rules, fixed before the runs they judge; and the list of runs a set
of studies needs (`planned_runs`). The runner is tlm.studies.ablate, the report tlm.studies.report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlm import RECIPES
from tlm_base.errors import ConfigError
from tlm.training.config import TrainConfig, load_config

CONFIG_DIR = RECIPES / "ablations"
SCALES = ("cpu", "h200")
LR_MULTIPLIERS = (0.2, 0.5, 1, 2, 5)
STABILITY_MULTIPLIERS = (0.2, 1, 5)
BATCH_MULTIPLIERS = (0.5, 1, 2)
KV_HEADS = (1, 2, 4, 8)
# The decision rules, fixed before the runs they judge (each is printed under its study in the report).
EQUIVALENCE_MARGIN = 0.05  # nats of validation loss: "no loss in perplexity" means within this (~5% perplexity)
TRAINS_MARGIN = 0.5  # nats: a run "trains" when its final validation loss is this far below the unigram loss
POSITION_PROBE_R2 = 0.5  # a model "infers position" when a linear probe of some layer reaches this held-out R^2
YARN_FACTORS = (2, 4, 8, 16)  # long-context evaluation at these multiples of the trained length
MUON_LR = 0.02  # Muon's centre rate (tlm's default: Keller Jordan's reference, nanochat), swept by LR_MULTIPLIERS
CURVE_EVERY = 50  # study 10 evaluates every this many steps, for its time-to-target curves

RULES = {
    "better": "the variant minus the baseline, paired over seeds: reproduced when the 95% CI of the difference in "
              "final validation loss lies above 0, not reproduced when below 0, inconclusive when it contains 0",
    "sweep": "for every other grid point, its final validation loss minus the baseline's, paired over seeds: reproduced "
             "when every 95% CI lies above 0 (the baseline beats each), not reproduced when some CI lies below 0 (a "
             "grid point beats it), inconclusive otherwise",
    "equivalent": f"two one-sided tests (TOST, 5% each) of each KV-head count against the baseline's: the 90% CI of the "
                  f"paired difference inside +-{EQUIVALENCE_MARGIN} nats is equivalent, entirely above "
                  f"+{EQUIVALENCE_MARGIN} is worse, entirely below -{EQUIVALENCE_MARGIN} better; reproduced when none is "
                  "worse or undecided, not reproduced when one is worse, inconclusive otherwise",
    "stability": f"a run trains when its final validation loss is finite and at least {TRAINS_MARGIN} nats below the "
                 "unigram loss of the validation split (predicting every token by its training frequency; a stalled "
                 "run sits on it); for pre- and post-norm, the highest rate of the grid at which every seed trains; "
                 "reproduced when pre-norm's is at least 5x post-norm's, not reproduced when lower, inconclusive when "
                 "either trains at no rate",
    "target": "each run's validation curve on one measure (the rows every periodic evaluation covers; at the last "
              "step the same rows of the final evaluation), linearly interpolated between evaluations; per seed, the "
              "target is the AdamW baseline's loss at its last step on that measure (a seed fixes the initial weights "
              "and the data order); Muon's rate is the one of its sweep with the lowest mean final validation loss "
              "(over the whole split); tokens to target = the first point of Muon's curve at or below the target "
              "(AdamW reaches it at its last step by definition); reproduced when, at that rate, every seed of Muon "
              "reaches the target with fewer tokens than AdamW and the 95% CI of the paired difference in final "
              "validation loss (Muon - AdamW, at equal tokens) lies below 0; not reproduced when some seed of Muon "
              "does not reach the target or that CI lies above 0; inconclusive otherwise",
    "yarn": f"at each of {', '.join(f'{f}x' for f in YARN_FACTORS)} the trained length (YaRN factor = that multiple), "
            "YaRN's loss minus plain RoPE's, paired over seeds: reproduced when every 95% CI lies below 0, not "
            "reproduced when one lies above 0, inconclusive otherwise",
}


@dataclass
class Study:
    """A claim and the variants that test it. kind: sweep | better | equivalent | stability | yarn."""

    name: str
    title: str
    claim: str
    kind: str
    baseline: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def rule(self) -> str:
        return RULES[self.kind]


def _number(value: float) -> str:
    return f"{value:.6g}"


def studies(base: TrainConfig) -> dict[str, Study]:
    """The studies, their variants derived from the base recipe."""
    lr = base.optim.lr
    batch = base.batch_shape(1).global_batch_size
    steps = base.train.max_steps
    heads = base.model.num_attention_heads
    lr_variants = {f"lr={_number(lr * m)}": ({} if m == 1 else {"optim.lr": lr * m}) for m in LR_MULTIPLIERS}
    batch_variants = {}
    for m in BATCH_MULTIPLIERS:
        size = int(batch * m)
        overrides = {} if m == 1 else {"batch.global_batch_size": size, "batch.micro_batch_size": min(size, base.batch.micro_batch_size)}
        if m != 1 and steps:
            overrides["train.max_steps"] = int(round(steps / m))  # the same number of tokens
        batch_variants[f"batch={size}"] = overrides
    stability = {}
    for position in ("pre", "post"):
        for m in STABILITY_MULTIPLIERS:
            overrides = {} if m == 1 else {"optim.lr": lr * m}
            if position == "post":
                overrides = {"model.norm_position": "post", **overrides}
            stability[f"{position} lr={_number(lr * m)}"] = overrides
    muon = {"optim.name": "muon", "eval.every": CURVE_EVERY}
    optimizers = {"adamw": {"eval.every": CURVE_EVERY}}
    optimizers.update({f"muon lr={_number(MUON_LR * m)}": {**muon, "optim.muon_lr": MUON_LR * m} for m in LR_MULTIPLIERS})
    kv = {f"kv_heads={k}": ({} if k == base.model.num_key_value_heads else {"model.num_key_value_heads": k})
          for k in KV_HEADS if heads % k == 0 and k <= heads}
    return {
        "lr": Study("lr", "1. Learning rate", "no learning rate of the sweep beats the baseline's", "sweep",
                    f"lr={_number(lr)}", lr_variants),
        "batch": Study("batch", "2. Batch size", "no batch size of the sweep beats the baseline's at equal tokens",
                       "sweep", f"batch={batch}", batch_variants),
        "norm": Study("norm", "3. RMSNorm vs no normalisation",
                      "RMSNorm converges to a lower loss than no normalisation", "better", "rmsnorm",
                      {"rmsnorm": {}, "none": {"model.norm": "none"}}),
        "norm_position": Study("norm_position", "4. Pre-norm vs post-norm",
                               "post-norm needs a ~5x lower learning rate to train stably; pre-norm allows the higher rate",
                               "stability", f"pre lr={_number(lr)}", stability),
        "position": Study("position", "5. NoPE vs RoPE", "RoPE converges to a lower loss than NoPE "
                          "(and a NoPE model still infers position)", "better", "rope",
                          {"rope": {}, "nope": {"model.position_embedding": "nope"}}),
        "mlp": Study("mlp", "6. SwiGLU vs SiLU", "SwiGLU converges to a lower loss than a SiLU MLP of about the same size",
                     "better", "swiglu", {"swiglu": {}, "silu": {"model.mlp": "silu"}}),
        "kv_heads": Study("kv_heads", "7. KV heads (GQA)",
                          f"fewer KV heads cut KV-cache memory up to {heads}x with no loss in perplexity "
                          f"(within {EQUIVALENCE_MARGIN} nats of {heads} heads)", "equivalent",
                          f"kv_heads={heads}", kv),
        "yarn": Study("yarn", "8. YaRN at inference",
                      "YaRN lets a model trained at the base length keep its perplexity at 2-16x that length "
                      "(the original uses factor 16)",
                      "yarn", "base", {"base": {}}),
        "documents": Study("documents", "9. Document masking",
                           "attention across document boundaries inside a packed row hurts: a model that attends only "
                           "within each document (train.document_masking=mask, evaluated the same way) converges "
                           "to a lower loss", "better", "mask",
                           {"mask": {"train.document_masking": "mask"}, "cross-document": {}}),
        "optimizer": Study("optimizer", "10. Muon vs AdamW: time to target",
                           f"Muon (torch.optim.Muon for the hidden matrices, AdamW at the baseline's rate for the rest) "
                           f"reaches the AdamW baseline's final validation loss with fewer tokens, and ends lower at "
                           f"equal tokens; Muon's rate swept x{', x'.join(_number(m) for m in LR_MULTIPLIERS)} around "
                           f"{MUON_LR} as AdamW's was", "target", "adamw", optimizers),
    }


def slug(overrides: dict[str, Any]) -> str:
    """A run name from the overrides: `base`, or `key=value-key=value` (last part of each key)."""
    if not overrides:
        return "base"
    return "-".join(f"{k.split('.')[-1]}={_number(v) if isinstance(v, float) else v}" for k, v in sorted(overrides.items()))


def base_config_path(scale: str) -> Path:
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {SCALES}, got {scale!r}")
    return CONFIG_DIR / f"{scale}.yaml"


def planned_runs(names: list[str], scale: str, seeds: int, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every distinct (overrides, seed) the chosen studies need, in order."""
    base = load_config(base_config_path(scale), extra)
    known = studies(base)
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        for overrides in known[name].variants.values():
            for seed in range(seeds):
                run = f"{slug(overrides)}-seed{seed}"
                runs.setdefault(run, {"name": run, "overrides": {**(extra or {}), **overrides, "train.seed": seed}})
    return list(runs.values())


def resolve_studies(study: str) -> list[str]:
    names = list(studies(load_config(base_config_path("cpu"))))
    if study == "all":
        return names
    if study not in names:
        raise ConfigError(f"unknown study '{study}'; studies: {', '.join(names)}, all, report")
    return [study]
UNIGRAM = "unigram.json"  # the unigram loss of the validation split, beside the runs
