"""Runs several short trainings in one process group (launched by the distributed tests).

    torchrun --nproc_per_node 2 tests/dist_driver.py PLAN.json RESULTS.json

PLAN.json is a list of {"name": ..., "overrides": {...}}; every rank runs every entry in order with
`tlm.training.trainer.train`, and rank 0 writes {name: [losses...]} to RESULTS.json. One launch for many runs keeps
the interpreter, DeepSpeed import and process-group start-up out of each run's cost.
"""

import json
import os
import sys

from tlm.training.trainer import shutdown, train
from tlm.training.config import load_config

plan = json.loads(open(sys.argv[1]).read())
results = {}
for entry in plan:
    config = load_config(entry.get("config"), entry["overrides"])
    summary = train(config)
    results[entry["name"]] = {"losses": [h["loss"] for h in summary["history"] if "loss" in h],
                              "world_size": summary["world_size"], "steps": summary["steps"],
                              "validation": [{k: h[k] for k in ("step", "val_loss", "val_tokens")}
                                             for h in summary["history"] if "val_loss" in h]}
if int(os.environ.get("RANK", "0")) == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
shutdown()
