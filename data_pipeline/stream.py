"""The training stream: shuffled batches for (rank, world size) derived from one global counter.

The global order is a sequence of row indices: epoch e is a permutation of all rows seeded by
(seed, e), and position p of the sequence is row perm_{p // N}[p % N]. The only state is
`consumed_samples`, the number of positions the whole job (all ranks) has consumed. A step at counter
c gives rank r the positions [c + r*m, c + (r+1)*m) for a micro-batch of m rows and moves c by m*world.

Hence: ranks partition every step (and every epoch) exactly; resuming needs the counter alone; and a
job that resumes on another world size, keeping the global batch (micro x accumulation x world), reads
the same rows in the same order for every optimizer step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data_pipeline.dataset import TokenRows
from tlm_base.errors import DataError


class GlobalOrder:
    """Position -> row index for a seeded, per-epoch shuffle (or the identity when shuffle is off)."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise DataError("the dataset split has no rows")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)
            self._epoch = epoch
        return self._perm

    def rows(self, start: int, count: int) -> np.ndarray:
        """Row indices of positions [start, start + count), across epoch boundaries."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.num_rows)
            take = min(count - done, self.num_rows - offset)
            out[done : done + take] = self.permutation(epoch)[offset : offset + take]
            done += take
        return out


DOCUMENT_MASKING = ("none", "mask", "mask_positions")


def document_masks(input_ids: torch.Tensor, eot: int, restart_positions: bool) -> dict[str, torch.Tensor]:
    """For packed rows: an attention mask (batch, 1, seq, seq), True where query i may attend key j: j <= i within
    i's document (a document ends with its end-of-text token); with `restart_positions`, position ids that start
    at 0 in every document, as if each were run alone."""
    ends = input_ids == eot
    document = torch.cumsum(ends.long(), dim=1) - ends.long()  # the separator belongs to the document it ends
    seq = input_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    out = {"attention_mask": (causal[None] & (document[:, :, None] == document[:, None, :]))[:, None]}
    if restart_positions:
        index = torch.arange(seq).expand_as(input_ids)
        start = torch.where(torch.cat([torch.ones_like(ends[:, :1]), ends[:, :-1]], dim=1), index, 0)
        out["position_ids"] = index - torch.cummax(start, dim=1).values
    return out


def make_batch(rows: TokenRows, indices: np.ndarray, pin_memory: bool = False,
               documents: str = "none") -> dict[str, torch.Tensor]:
    """input_ids / labels (shifted by one) and, in no-pack mode, loss_mask (True where a label is real); with
    `documents` = mask / mask_positions, packed rows also get the per-document attention mask (and positions)."""
    tokens, lengths = rows.gather(indices)
    data = torch.from_numpy(tokens)
    batch = {"input_ids": data[:, :-1], "labels": data[:, 1:]}
    if documents != "none":
        batch.update(document_masks(batch["input_ids"], rows.manifest["tokenizer"]["eot_token_id"],
                                    documents == "mask_positions"))
    if lengths is not None:
        positions = torch.arange(1, rows.row_length)
        batch["loss_mask"] = positions[None, :] < torch.from_numpy(lengths)[:, None]
    if pin_memory:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


class TokenStream:
    """Infinite, shuffled micro-batches of a split for one rank, resumable from `state_dict()`.

    Batches are built ahead in a background thread (`prefetch` of them), so the training loop only
    takes them from a queue; `consumed_samples` counts what the loop has taken, not what was built.
    """

    def __init__(
        self,
        rows: TokenRows,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 4,
        pin_memory: bool = False,
        documents: str = "none",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.order = GlobalOrder(len(rows), seed, shuffle)
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.documents = documents
        self.consumed_samples = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    @property
    def step_samples(self) -> int:
        """Positions one call of `next()` consumes across all ranks."""
        return self.micro_batch_size * self.world_size

    @property
    def epoch(self) -> float:
        return self.consumed_samples / len(self.rows)

    def indices_at(self, consumed: int) -> np.ndarray:
        """Row indices this rank reads at global counter `consumed`."""
        start = consumed + self.rank * self.micro_batch_size
        return self.order.rows(start, self.micro_batch_size)

    def batch_at(self, consumed: int) -> dict[str, torch.Tensor]:
        return make_batch(self.rows, self.indices_at(consumed), self.pin_memory, self.documents)

    # --- iteration with prefetch -------------------------------------------------------------------

    def _produce(self, start: int, out: queue.Queue, stop: threading.Event) -> None:
        consumed = start
        try:
            while not stop.is_set():
                item = (consumed, self.batch_at(consumed))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                consumed += self.step_samples
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            out.put((None, e))

    def _start(self) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._thread = threading.Thread(
            target=self._produce, args=(self.consumed_samples, self._queue, self._stop), daemon=True, name="tlm-stream"
        )
        self._thread.start()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch <= 0:
            batch = self.batch_at(self.consumed_samples)
            self.consumed_samples += self.step_samples
            return batch
        if self._thread is None:
            self._start()
        consumed, batch = self._queue.get()
        if consumed is None:
            raise batch
        assert consumed == self.consumed_samples, "prefetch queue out of step with the counter"
        self.consumed_samples = consumed + self.step_samples
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (it restarts on the next `next()`)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        self._thread, self._queue = None, None

    # --- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": len(self.rows),
            "dataset_fingerprint": self.rows.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved counter; refuse a state that belongs to other data or another order."""
        if state["dataset_fingerprint"] != self.rows.fingerprint or state["num_rows"] != len(self.rows):
            raise DataError("the saved data position belongs to another prepared dataset "
                            f"({state['num_rows']} rows, fingerprint {state['dataset_fingerprint'][:12]}...) than this one "
                            f"({len(self.rows)} rows, {self.rows.fingerprint[:12]}...)")
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise DataError(f"the saved data position used seed={state['seed']}, shuffle={state['shuffle']}; "
                            f"this stream has seed={self.seed}, shuffle={self.shuffle}")
        self.close()
        self.consumed_samples = int(state["consumed_samples"])


def validation_batches(rows: TokenRows, batch_size: int, rank: int = 0, world_size: int = 1,
                       max_rows: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One ordered pass over a split (no shuffle), rows partitioned round-robin over ranks."""
    total = len(rows) if max_rows is None else min(max_rows, len(rows))
    mine = np.arange(rank, total, world_size, dtype=np.int64)
    for start in range(0, len(mine), batch_size):
        yield make_batch(rows, mine[start : start + batch_size])
