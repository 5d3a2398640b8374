"""Weighted mixtures (`data.mix`): proportions, the rows they read, refusals, exact resume, and a training run
that logs validation per part."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import TINYSHAKESPEARE
from data_pipeline.dataset import TokenRows
from tlm_base.errors import DataError
from data_pipeline.mixture import MixedRows, MixPart, allocate, parse_mix
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.stream import TokenStream
from tlm.training.config import load_config
from tlm.training.trainer import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def plays(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path) -> Path:
    """tinyshakespeare prepared like the `prepared` fixture (same tokenizer, 64-token rows, 5% validation)."""
    out = tmp_path_factory.mktemp("plays") / "data"
    prepare(PrepareConfig(data=[str(TINYSHAKESPEARE)], tokenizer=str(data_tokenizer), out=str(out), seq_len=64,
                          val=0.05, sample_by="paragraph"), progress=False)
    return out


def mix(prepared: Path, plays: Path, weights=(0.8, 0.2)) -> list[MixPart]:
    return [MixPart("speeches", str(prepared), weights[0]), MixPart("plays", str(plays), weights[1])]


def test_allocation_follows_the_weights() -> None:
    assert allocate([0.7, 0.2, 0.1], 1000) == [700, 200, 100]
    assert allocate([1, 1, 1], 1000) == [334, 333, 333] and sum(allocate([0.5, 0.3, 0.2], 997)) == 997


def test_a_pass_holds_each_part_in_its_weight_and_reads_its_rows(prepared: Path, plays: Path) -> None:
    rows = MixedRows(mix(prepared, plays, (0.8, 0.2)), seed=0)
    sizes = [len(TokenRows(prepared)), len(TokenRows(plays))]
    assert len(rows) == sum(sizes) and rows.counts == allocate([0.8, 0.2], sum(sizes))
    assert rows.epochs["speeches"] == pytest.approx(0.8 * sum(sizes) / sizes[0], rel=1e-3)
    assert rows.epochs["speeches"] > 1.5 and rows.epochs["plays"] < 0.5  # weighted above its size: it repeats
    # every mixture row is a row of the part it comes from
    picked = np.array([0, 5, rows.counts[0] - 1, rows.counts[0], len(rows) - 1])
    block, _ = rows.gather(picked)
    for index, row in zip(picked, block):
        part = int(rows.part_of(np.array([index]))[0])
        source = TokenRows([prepared, plays][part])
        local = rows.orders[part][(index - rows.starts[part]) % len(source)]
        assert (row == source.gather(np.array([local]))[0][0]).all()


def test_the_stream_realises_the_weights(prepared: Path, plays: Path) -> None:
    rows = MixedRows(mix(prepared, plays, (0.7, 0.3)), seed=3)
    stream = TokenStream(rows, micro_batch_size=64, seed=3, prefetch=0)
    taken = np.concatenate([stream.indices_at(c) for c in range(0, 64 * 60, 64)])  # 3,840 samples
    share = float((rows.part_of(taken) == 1).mean())
    sigma = math.sqrt(0.3 * 0.7 / len(taken))
    assert abs(share - 0.3) < 4 * sigma  # within sampling noise of the weight
    full = np.concatenate([stream.indices_at(c) for c in range(0, len(rows), 64)])[: len(rows)]
    assert np.bincount(rows.part_of(full)).tolist() == rows.counts  # a whole pass: exactly the weights


def test_resume_and_a_world_size_change_read_the_same_rows(prepared: Path, plays: Path) -> None:
    rows = MixedRows(mix(prepared, plays), seed=0)
    one = TokenStream(rows, micro_batch_size=8, seed=0, prefetch=0)
    straight = [next(one)["input_ids"] for _ in range(6)]
    two = [TokenStream(rows, micro_batch_size=4, rank=r, world_size=2, seed=0, prefetch=0) for r in range(2)]
    state = None
    for step in range(6):
        if step == 3:  # checkpoint, then resume on one rank
            state = two[0].state_dict()
            resumed = TokenStream(MixedRows(mix(prepared, plays), seed=0), micro_batch_size=8, seed=0, prefetch=0)
            resumed.load_state_dict(state)
        if step < 3:
            merged = np.concatenate([next(s)["input_ids"].numpy() for s in two])
        else:
            merged = next(resumed)["input_ids"].numpy()
        assert (merged == straight[step].numpy()).all()
    other = TokenStream(MixedRows(mix(prepared, plays, (0.5, 0.5)), seed=0), micro_batch_size=8, seed=0, prefetch=0)
    with pytest.raises(DataError, match="belongs to another prepared dataset"):
        other.load_state_dict(state)  # other weights: another mixture


def test_mixtures_that_cannot_be_mixed_are_refused(tmp_path: Path, prepared: Path, data_tokenizer: Path) -> None:
    longer = tmp_path / "longer"
    prepare(PrepareConfig(data=[str(TINYSHAKESPEARE)], tokenizer=str(data_tokenizer), out=str(longer), seq_len=32,
                          val=0.0, sample_by="paragraph"), progress=False)
    with pytest.raises(DataError, match="has another row length than"):
        MixedRows([MixPart("a", str(prepared), 1.0), MixPart("b", str(longer), 1.0)], seed=0)
    for bad, message in (([], "must be a list"), ([{"path": "x", "weight": -1}], r"data.mix\[0\].weight must be"),
                         ([{"path": "x", "wieght": 1}], r"data.mix\[0\] must be"),
                         ([{"path": "a/x"}, {"path": "b/x"}], "named alike")):
        with pytest.raises(DataError, match=message):
            parse_mix(bad)


def test_a_mixture_trains_logs_each_part_and_resumes_exactly(tmp_path: Path, prepared: Path, plays: Path) -> None:
    entries = [{"path": str(prepared), "weight": 0.8, "name": "speeches"}, {"path": str(plays), "weight": 0.2}]

    def config(run: str, **extra):
        return load_config(CONFIGS / "debug.yaml", {"data.mix": entries, "logging.run_dir": str(tmp_path / run),
                                                     "logging.sample_prompt": None, "logging.wandb": "disabled",
                                                     "eval.max_batches": 2, **extra})

    straight = train(config("straight"))
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_loss" in r][-1]
    parts = {"speeches": last["val_loss/speeches"], "data": last["val_loss/data"]}
    tokens = {name: last[f"val_tokens/{name}"] for name in parts}
    assert last["val_loss"] == pytest.approx(sum(parts[n] * tokens[n] for n in parts) / sum(tokens.values()))
    assert "val_bpb/speeches" in last and last["val_bpb"] > 0
    train(config("resumed", **{"train.stop_at": 4}))
    resumed = train(config("resumed"))
    assert resumed["val_loss"] == straight["val_loss"] and resumed["steps"] == straight["steps"]
    other = [dict(entries[0]), {**entries[1], "weight": 0.5}]
    shutil.copytree(tmp_path / "resumed", tmp_path / "other")
    with pytest.raises(Exception, match="data weight 0.2 -> 0.5|weight 0.2 -> 0.5"):
        train(load_config(CONFIGS / "debug.yaml", {"data.mix": other, "logging.run_dir": str(tmp_path / "other"),
                                                   "logging.sample_prompt": None, "logging.wandb": "disabled",
                                                   "train.max_steps": 12, "checkpoint.allow_change": "train.max_steps"}))
