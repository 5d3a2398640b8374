"""The stream: exact partition over ranks, exact resume, resume on another world size, validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.dataset import TokenRows
from data_pipeline.prepare import PrepareConfig, prepare
from tlm_base.errors import DataError
from data_pipeline.stream import GlobalOrder, TokenStream, validation_batches


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path, shakespeare_jsonl: Path) -> TokenRows:
    out = tmp_path_factory.mktemp("stream") / "data"
    prepare(PrepareConfig(data=[str(shakespeare_jsonl)], tokenizer=str(data_tokenizer), out=str(out), seq_len=32,
                          shard_mb=0.01, val=0.05), progress=False)
    return TokenRows(out)


def epoch_rows(rows: TokenRows, micro: int, world: int, seed: int = 0) -> list[np.ndarray]:
    """Per rank, the row indices read over the first full epoch (whole steps only)."""
    streams = [TokenStream(rows, micro, rank=r, world_size=world, seed=seed, prefetch=0) for r in range(world)]
    steps = len(rows) // (micro * world)
    return [np.concatenate([s.indices_at(c * micro * world) for c in range(steps)]) for s in streams]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_each_epoch_exactly(rows: TokenRows, world: int) -> None:
    micro = 5
    per_rank = epoch_rows(rows, micro, world)
    together = np.concatenate(per_rank)
    steps = len(rows) // (micro * world)
    assert len(together) == steps * micro * world
    assert len(np.unique(together)) == len(together)  # no row twice
    # What is left of the epoch after the last whole step is read at the start of the next step: none skipped.
    order = GlobalOrder(len(rows), seed=0)
    leftover = order.rows(steps * micro * world, len(rows) - steps * micro * world)
    assert sorted(np.concatenate([together, leftover]).tolist()) == list(range(len(rows)))


def test_each_epoch_has_its_own_seeded_order(rows: TokenRows) -> None:
    order = GlobalOrder(len(rows), seed=3)
    first, second = order.rows(0, len(rows)), order.rows(len(rows), len(rows))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(len(rows)))
    assert not np.array_equal(first, second)
    assert np.array_equal(GlobalOrder(len(rows), seed=3).rows(0, 50), first[:50])
    assert not np.array_equal(GlobalOrder(len(rows), seed=4).rows(0, 50), first[:50])
    assert np.array_equal(GlobalOrder(len(rows), seed=3, shuffle=False).rows(5, 3), [5, 6, 7])


def take(stream: TokenStream, n: int) -> list[torch.Tensor]:
    return [next(stream)["input_ids"].clone() for _ in range(n)]


def test_batches_are_shifted_inputs_and_labels(rows: TokenRows) -> None:
    batch = next(TokenStream(rows, 4, prefetch=0))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert "loss_mask" not in batch


@pytest.mark.parametrize("stop_at", [1, 7, 400])  # 400 steps of 8 rows run past the end of the first epoch
def test_resume_from_state_dict_continues_exactly(rows: TokenRows, stop_at: int) -> None:
    uninterrupted = take(TokenStream(rows, 8, seed=1, prefetch=3), stop_at + 5)
    first = TokenStream(rows, 8, seed=1, prefetch=3)
    take(first, stop_at)
    state = first.state_dict()
    first.close()
    assert state["consumed_samples"] == stop_at * 8
    resumed = TokenStream(rows, 8, seed=1, prefetch=3)
    resumed.load_state_dict(state)
    for a, b in zip(take(resumed, 5), uninterrupted[stop_at:]):
        assert torch.equal(a, b)
    resumed.close()


def global_steps(rows: TokenRows, world: int, micro: int, accumulation: int, steps: int, start: int = 0) -> list[list[int]]:
    """Per optimizer step, the rows all ranks read together (rank order within each micro-step)."""
    streams = [TokenStream(rows, micro, rank=r, world_size=world, seed=7, prefetch=0) for r in range(world)]
    for s in streams:
        s.consumed_samples = start
    out = []
    for _ in range(steps):
        step = []
        for _ in range(accumulation):
            step += [i for s in streams for i in s.indices_at(s.consumed_samples).tolist()]
            for s in streams:
                next(s)
        out.append(sorted(step))
    return out


@pytest.mark.parametrize("before, after", [((2, 4, 1), (1, 4, 2)), ((1, 6, 1), (3, 2, 1)), ((2, 3, 2), (3, 2, 2))])
def test_resume_on_another_world_size_keeps_the_global_order(rows: TokenRows, before: tuple, after: tuple) -> None:
    """(world, micro, accumulation): the global batch is kept, so each optimizer step reads the same rows."""
    reference = global_steps(rows, before[0], before[1], before[2], steps=12)
    first = TokenStream(rows, before[1], rank=0, world_size=before[0], seed=7, prefetch=0)
    for _ in range(5 * before[2]):
        next(first)
    state = first.state_dict()
    streams = [TokenStream(rows, after[1], rank=r, world_size=after[0], seed=7, prefetch=0) for r in range(after[0])]
    for s in streams:
        s.load_state_dict(state)
    continued = global_steps(rows, after[0], after[1], after[2], steps=7, start=state["consumed_samples"])
    assert continued == reference[5:]


def test_state_from_other_data_is_refused(rows: TokenRows) -> None:
    stream = TokenStream(rows, 4, seed=0, prefetch=0)
    state = stream.state_dict()
    with pytest.raises(DataError, match="another prepared dataset"):
        stream.load_state_dict({**state, "dataset_fingerprint": "f" * 64})
    with pytest.raises(DataError, match="used seed=5"):
        stream.load_state_dict({**state, "seed": 5})


def test_prefetch_and_direct_reads_agree(rows: TokenRows) -> None:
    a = take(TokenStream(rows, 6, rank=1, world_size=2, prefetch=0), 10)
    b = take(TokenStream(rows, 6, rank=1, world_size=2, prefetch=2), 10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_validation_pass_is_ordered_and_partitioned(tmp_path: Path, rows: TokenRows) -> None:
    val = TokenRows(rows.root, "val")
    whole = torch.cat([b["input_ids"] for b in validation_batches(val, 7)])
    assert whole.shape[0] == len(val)
    assert torch.equal(whole[3], torch.from_numpy(val.row(3)[:-1].astype(np.int64)))
    parts = [torch.cat([b["input_ids"] for b in validation_batches(val, 7, rank=r, world_size=3)]) for r in range(3)]
    assert sum(p.shape[0] for p in parts) == len(val)
    assert torch.equal(parts[1][0], whole[1]) and torch.equal(parts[2][1], whole[5])
    assert sum(b["input_ids"].shape[0] for b in validation_batches(val, 4, max_rows=10)) == 10
