"""`python -m tlm.training.launch torchrun|deepspeed ARGS`: the two launchers, with Ctrl-C ending them in one line.

On Ctrl-C every tlm rank finishes its step, writes its part of one checkpoint, and rank 0 says so in one line
(exit 130). The launchers themselves add noise of their own: torchrun raises SignalException with a
traceback once its workers are done, and the deepspeed runner a KeyboardInterrupt traceback while it waits
for them. These wrappers keep the launchers' behaviour (signals passed on, workers waited for) and end them
quietly, with status 130 when they were interrupted. launch/torchrun.sh and launch/deepspeed.sh use them.
"""

from __future__ import annotations

import os
import signal
import sys


def torchrun(args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    # Give workers time to checkpoint after the signal before torchrun kills them (its default is 30 s).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    try:
        main(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def deepspeed(args: list[str]) -> int:
    from deepspeed.launcher.runner import main

    interrupted = []
    # The runner waits for its launcher, which passes the stop on (SIGTERM) to every rank; a Ctrl-C here is
    # noted, not raised (the ranks get their own from the terminal).
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return 130 if interrupted else code


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("torchrun", "deepspeed"):
        print("usage: python -m tlm.training.launch torchrun|deepspeed LAUNCHER_ARGS", file=sys.stderr)
        sys.exit(2)
    launcher, args = sys.argv[1], sys.argv[2:]
    sys.exit(torchrun(args) if launcher == "torchrun" else deepspeed(args))


if __name__ == "__main__":
    main()
