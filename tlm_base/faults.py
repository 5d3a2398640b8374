"""Fault injection for the reliability tests and scripts/fault_inject.py (off unless $TLM_FAULT is set).

    TLM_FAULT="nan@3"                 the gradients of step 3 (1-based) are NaN on every rank
    TLM_FAULT="nan@3:rank1"           ... on rank 1 only (its NaN reaches every rank through the all-reduce)
    TLM_FAULT="kill_in_save@4:rank0"  SIGKILL rank 0 while it writes the checkpoint of step 4, after the
                                      backend's state and before the COMPLETE marker
    TLM_FAULT="kill@5"                SIGKILL every rank as step 5 begins
    TLM_FAULT="fail@5:rank1"          rank 1 raises a full disk (ENOSPC) as step 5 begins, the others go on
    TLM_FAULT="hang@5:rank1"          rank 1 stops as step 5 begins, alive but silent (a hung device or file
                                      system, a link down): the others wait in their next collective
    TLM_FAULT="stall_in_save@any"     sleep 60 s inside every checkpoint write (before COMPLETE): a slow disk,
                                      for the tests of a second Ctrl-C and of the stop grace period
    TLM_FAULT="kill_in_export@any"    SIGKILL `tlm export` half-way (its weights written beside OUT, the rest not)
    TLM_FAULT="stall_in_export@any"   sleep 60 s at that point, holding OUT's lock (for a second export racing it)

Items are comma-separated. Nothing here runs in a normal run: `active()` is an empty dict without the
variable, and each hook is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("tlm")
KINDS = ("nan", "kill", "fail", "hang", "kill_in_save", "stall_in_save", "kill_in_export", "stall_in_export")
ANY = -1


def active() -> dict[tuple[str, int], int | None]:
    """{(kind, step): rank or None for every rank} from $TLM_FAULT."""
    spec = os.environ.get("TLM_FAULT", "").strip()
    faults: dict[tuple[str, int], int | None] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            kind, _, where = item.partition("@")
            step, _, rank = where.partition(":")
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {KINDS}")
            faults[(kind, ANY if step == "any" else int(step))] = int(rank.removeprefix("rank")) if rank else None
        except ValueError as e:
            raise ValueError(f"TLM_FAULT item '{item}': {e} (expected KIND@STEP, KIND@any or KIND@STEP:rankR)") from None
    return faults


def hit(faults: dict[tuple[str, int], int | None], kind: str, step: int, rank: int) -> bool:
    """Whether fault `kind` is set for `step` on this rank."""
    key = (kind, step) if (kind, step) in faults else (kind, ANY)
    if key not in faults:
        return False
    target = faults[key]
    return target is None or target == rank


def at_step_start(faults: dict[tuple[str, int], int | None], step: int, rank: int) -> None:
    """The faults set to strike as step `step` begins on this rank: SIGKILL, a full disk, a hang."""
    if hit(faults, "kill", step, rank):
        kill_self(f"as step {step} begins")
    if hit(faults, "fail", step, rank):
        fail_here(step)
    if hit(faults, "hang", step, rank):
        hang_here(step)


def fail_here(step: int) -> None:
    """Raise what a full disk raises, as step `step` begins."""
    import errno

    log.warning("fault injection: a full disk as step %d begins", step)
    raise OSError(errno.ENOSPC, "No space left on device (fault injection)", "the checkpoint folder")


def hang_here(step: int) -> None:
    """Block this process for good (signals still end it), as step `step` begins."""
    import time

    log.warning("fault injection: hanging as step %d begins", step)
    while True:
        time.sleep(3600)


def kill_self(reason: str) -> None:
    """SIGKILL this process (no handler, no cleanup, no flush): what the OOM killer or a node failure does."""
    log.warning("fault injection: SIGKILL (%s)", reason)
    os.kill(os.getpid(), signal.SIGKILL)
