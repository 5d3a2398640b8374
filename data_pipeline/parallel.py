"""Tokenizing on every core inside one `tlm prepare`: batches go to N worker processes, results come back in
the order the batches were read.

The reading, the packing into rows and the shard writing stay in the main process, in reading order, so the
output (and the journal a resume reads) is byte-identical whatever N is: the workers only turn text into ids.
Each worker runs the tokenizer single-threaded (N processes of one thread each, so CPU time per token does not
grow with N), and at most `2 x N` batches are in flight, so memory is bounded by N, never by the corpus.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

_tokenizer = None  # the worker's own tokenizer


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; a Slurm allocation or a cgroup shows here)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init_worker(tokenizer_json: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process; N processes use N cores
    from tokenizers import Tokenizer

    _tokenizer = Tokenizer.from_str(tokenizer_json)
    _tokenizer.encode_special_tokens = True


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `texts`, concatenated, and each text's count (two arrays pickle far cheaper than N lists)."""
    encodings = _tokenizer.encode_batch(texts, add_special_tokens=False)
    arrays = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return (np.concatenate(arrays) if arrays else np.empty(0, np.uint32)), lengths


def split_ids(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Undo `_encode`'s concatenation."""
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []


class BatchEncoder:
    """Encodes batches of texts in submission order, in this process (num_proc 1) or in a pool (`num_proc` is
    checked by `prepare`, before any work).

    `submit(texts, done)` queues a batch; `done(list of id arrays)` is called for each batch in the order the
    batches were submitted, from `submit` or `drain`. The pool starts with the second batch, so an input of
    one batch never pays for it.
    """

    def __init__(self, tokenizer: Any, num_proc: int, dtype: np.dtype) -> None:
        self.tokenizer = tokenizer
        self.num_proc = num_proc
        self.dtype = dtype
        self.pool = None
        self.batches = 0
        self.pending: deque[tuple[Any, Callable[[list[np.ndarray]], None]]] = deque()

    def submit(self, texts: list[str], done: Callable[[list[np.ndarray]], None]) -> None:
        self.batches += 1
        if self.num_proc == 1 or self.batches == 1:
            self.drain()  # in order: whatever the pool holds comes first
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            done([np.asarray(e.ids, dtype=self.dtype) for e in encodings])
            return
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(
                self.num_proc, initializer=_init_worker, initargs=(self.tokenizer.to_str(),))
        self.pending.append((self.pool.apply_async(_encode, (texts,)), done))
        while len(self.pending) > 2 * self.num_proc:
            self._finish_one()

    def _finish_one(self) -> None:
        result, done = self.pending.popleft()
        ids, lengths = result.get()
        done(split_ids(ids.astype(self.dtype, copy=False), lengths))

    def drain(self) -> None:
        """Wait for every queued batch and hand it on."""
        while self.pending:
            self._finish_one()

    def close(self, abort: bool = False) -> None:
        """Stop the workers (at once when aborting: a kill, Ctrl-C or an error leaves no process behind)."""
        if self.pool is not None:
            if abort:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None
        self.pending.clear()
