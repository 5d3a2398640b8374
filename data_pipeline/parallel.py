"""Tokenizing on every core inside one `tlm prepare`: batches go to N worker processes, results come back in
the order the batches were read.

The reading, the packing into rows and the shard writing stay in the main process, in reading order, so the
output (and the journal a resume reads) is byte-identical whatever N is: the workers only turn text into ids.
Each worker runs the tokenizer single-threaded (N processes of one thread each, so CPU time per token does not
grow with N), and at most `2 x N` batches are in flight, so memory is bounded by N, never by the corpus.

Each worker has a pipe of its own each way and batches go round-robin, so results come back in order without a
shared queue: no lock a dying worker could leave held (`multiprocessing.Pool`'s shared queue has one, and its
terminate() then hangs when a signal to the whole process group killed its workers first), no worker respawned
behind the main process's back. Stopping is the main process's alone: the workers ignore Ctrl-C and SIGHUP
(which a terminal sends to every process of its group) and the main process stops them (`close(abort=True)`,
SIGKILL) instead of each printing a traceback; the kernel sends them SIGTERM when the main process dies in any
way (kill -9 included), so none outlives it or writes a BrokenPipeError to its terminal.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

_tokenizer = None  # the worker's own tokenizer
_TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; a Slurm allocation or a cgroup shows here)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _die_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def _init_worker(tokenizer_json: str, parent: int) -> None:
    global _tokenizer
    for sig in _TERMINAL_SIGNALS:  # the main process stops the workers (see the module docstring)
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with(parent)
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


def _work(tokenizer_json: str, parent: int, tasks: Any, results: Any) -> None:
    """A worker: batches in, (True, ids, lengths) or (False, traceback text) out, until None or the pipe ends."""
    _init_worker(tokenizer_json, parent)
    while True:
        try:
            texts = tasks.recv()
        except (EOFError, OSError):
            return
        if texts is None:
            return
        try:
            reply = (True, *_encode(texts))
        except Exception:
            reply = (False, traceback.format_exc())
        try:
            results.send(reply)
        except OSError:
            return


def split_ids(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Undo `_encode`'s concatenation."""
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []


class _Worker:
    """One tokenizing process with a pipe each way; a thread of the main process feeds it, so that a send never
    blocks the main process while the worker waits for its result to be read."""

    def __init__(self, context: Any, tokenizer_json: str) -> None:
        task_end, self.tasks = context.Pipe(duplex=False)
        self.results, result_end = context.Pipe(duplex=False)
        self.process = context.Process(target=_work, args=(tokenizer_json, os.getpid(), task_end, result_end),
                                       daemon=True, name="tlm-tokenize")
        self.process.start()
        task_end.close()  # the worker holds the only other ends: its death is an EOF here
        result_end.close()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.feeder = threading.Thread(target=self._feed, daemon=True, name="tlm-tokenize-feed")
        self.feeder.start()

    def _feed(self) -> None:
        while True:
            texts = self.outbox.get()
            try:
                self.tasks.send(texts)
            except OSError:  # the worker is gone; the main process finds out when it reads
                return
            if texts is None:
                return

    def submit(self, texts: list[str]) -> None:
        self.outbox.put(texts)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            reply = self.results.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"a tokenizing worker (pid {self.process.pid}) ended unexpectedly (exit code "
                               f"{self.process.exitcode})") from None
        if not reply[0]:
            raise RuntimeError(f"tokenizing failed in a worker process:\n{reply[1]}")
        return reply[1], reply[2]

    def stop(self, abort: bool) -> None:
        self.outbox.put(None)
        if abort:
            self.process.kill()
        self.process.join(None if abort else 30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.tasks.close()
        self.results.close()


class BatchEncoder:
    """Encodes batches of texts in submission order, in this process (num_proc 1) or in N worker processes
    (`num_proc` is checked by `prepare`, before any work).

    `submit(texts, done)` queues a batch; `done(list of id arrays)` is called for each batch in the order the
    batches were submitted, from `submit` or `drain`. The workers start with the second batch, so an input of
    one batch never pays for them.
    """

    def __init__(self, tokenizer: Any, num_proc: int, dtype: np.dtype) -> None:
        self.tokenizer = tokenizer
        self.num_proc = num_proc
        self.dtype = dtype
        self.workers: list[_Worker] | None = None
        self.batches = 0
        self.pending: deque[tuple[_Worker, Callable[[list[np.ndarray]], None]]] = deque()

    def submit(self, texts: list[str], done: Callable[[list[np.ndarray]], None]) -> None:
        self.batches += 1
        if self.num_proc == 1 or self.batches == 1:
            self.drain()  # in order: whatever the workers hold comes first
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            done([np.asarray(e.ids, dtype=self.dtype) for e in encodings])
            return
        if self.workers is None:
            self.workers = self._start()
        worker = self.workers[self.batches % self.num_proc]  # round-robin: each worker's results come in order
        worker.submit(texts)
        self.pending.append((worker, done))
        while len(self.pending) > 2 * self.num_proc:
            self._finish_one()

    def _start(self) -> list[_Worker]:
        """The workers, started with Ctrl-C and SIGHUP ignored (a spawned process inherits SIG_IGN, so they are
        ignored from its first instruction, not only once its initializer runs)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _TERMINAL_SIGNALS}
        workers: list[_Worker] = []
        try:
            context = multiprocessing.get_context("spawn")
            tokenizer_json = self.tokenizer.to_str()
            for _ in range(self.num_proc):
                workers.append(_Worker(context, tokenizer_json))
        except BaseException:
            for worker in workers:
                worker.stop(abort=True)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return workers

    def _finish_one(self) -> None:
        worker, done = self.pending.popleft()
        ids, lengths = worker.result()
        done(split_ids(ids.astype(self.dtype, copy=False), lengths))

    def drain(self) -> None:
        """Wait for every queued batch and hand it on."""
        while self.pending:
            self._finish_one()

    def close(self, abort: bool = False) -> None:
        """Stop the workers (at once when aborting: a kill, Ctrl-C or an error leaves no process behind)."""
        workers, self.workers = self.workers, None
        self.pending.clear()
        for worker in workers or []:
            worker.stop(abort)
