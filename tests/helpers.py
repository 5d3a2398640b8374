"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import itertools
import random

from tlm.model.config import MLPS, NORM_POSITIONS, NORMS, POSITION_EMBEDDINGS, ModelConfig, get_preset

WORDS = (
    "the king queen castle river night day sword ship sea storm light dark old young tale road horse "
    "house garden letter friend enemy heart voice mother father child winter summer fire stone gold "
    "silver said walked ran looked found gave took saw heard knew thought loved feared and but or so "
    "then when where while because never always often again quickly slowly softly loudly"
).split()


def synthetic_text(num_lines: int, seed: int = 0) -> list[str]:
    """Deterministic English-looking lines for training a small test tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ", she said."]))
    return lines


def switch_combinations(include_kv: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    """Every combination of the ablation switches on the debug preset (4 query heads)."""
    combos = []
    for norm, position, pe, mlp, kv in itertools.product(NORMS, NORM_POSITIONS, POSITION_EMBEDDINGS, MLPS, include_kv):
        combos.append(
            {"norm": norm, "norm_position": position, "position_embedding": pe, "mlp": mlp, "num_key_value_heads": kv}
        )
    return combos


def combo_id(combo: dict) -> str:
    return "-".join(str(v) for v in combo.values())


def debug_config(**overrides) -> ModelConfig:
    return get_preset("debug", **overrides)
