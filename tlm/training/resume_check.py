"""A resume proves its config: the configuration saved with a checkpoint is compared with the new one.

Three kinds of keys, each field's kind stated where the field is defined (tlm.training.config: `identity(...)`,
`on_purpose(...)`, `free(...)`):
- identity: what the weights and the data mean (every model field, resolved; the tokenizer and the prepared
  data, by content; data.seq_len, data.pack, train.seed). A change is refused, always: the run folder would
  hold weights its config does not describe. The way out is a new run.
- on purpose: run length and optimisation (max_steps, epochs, lr, schedule, batch, clipping, precision, the
  eval / log / checkpoint cadence, the speed switches). Refused unless named in
  `--checkpoint.allow_change=KEY,...` (or `SECTION.*`); then logged as a diff in metrics.jsonl, summary.json
  and the wandb config.
- free: where things are and how they are shown (paths whose content is checked as identity, stop_at,
  how many old checkpoints are kept, progress bars, wandb mode, the sample prompt, prefetch, the stop grace
  period). Never refused.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from tlm_base.errors import CheckpointError
from tlm.training.config import NEW_RUN, allowed_patterns, flatten_config, resume_kinds

TOKENIZER_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def diff_lines(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())


def model_changes(old: dict[str, Any], new: dict[str, Any], with_tokenizer_ids: bool) -> dict[str, tuple[Any, Any]]:
    keys = [k for k in dict.fromkeys([*old, *new]) if with_tokenizer_ids or k not in TOKENIZER_FIELDS]
    return {f"model.{k}": (old.get(k), new.get(k)) for k in keys
            if json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(new.get(k)))}


def check_config(checkpoint: Path, saved: dict[str, Any], config_tree: dict[str, Any], saved_model: dict[str, Any] | None,
                 new_model: dict[str, Any], allow: Any) -> dict[str, tuple[Any, Any]]:
    """Compare a checkpoint's saved config with this run's, before anything is built.

    Refuses identity changes (the model's fields except the tokenizer's special ids, which are checked
    with the tokenizer later) and unallowed on-purpose changes, each listed old -> new; returns the allowed
    changes (to be logged).
    """
    old, new = flatten_config(saved), flatten_config(config_tree)
    old.setdefault("optim.name", "adamw")  # a checkpoint from before Muon holds AdamW's state
    patterns = allowed_patterns(allow, set(new))
    identity = model_changes(saved_model, new_model, with_tokenizer_ids=False) if saved_model is not None else {}
    kinds = resume_kinds()
    identity.update({k: (old.get(k), new.get(k)) for k, kind in kinds.items()
                     if kind == "identity" and k in old and old.get(k) != new.get(k)})
    if identity:
        raise CheckpointError(f"cannot resume {checkpoint}: {diff_lines(identity)}; these change what the weights or the "
                              f"data mean; {NEW_RUN}")
    changed = {k: (old.get(k), new.get(k)) for k in new if k in old and old[k] != new[k] and kinds.get(k) != "free"}
    unallowed = {k: v for k, v in changed.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    if unallowed:
        keys = ",".join(unallowed)
        raise CheckpointError(f"cannot resume {checkpoint} with a changed config: {diff_lines(unallowed)}; to change "
                              f"them on purpose pass --checkpoint.allow_change={keys} (the change is logged), or restore "
                              "them")
    return changed


def check_data(checkpoint: Path, saved: dict[str, Any] | None, fingerprint: str, tokenizer_sha256: str | None,
               changes: str | None = None) -> None:
    """Refuse a resume on other data or another tokenizer than the checkpoint's (by content)."""
    if not saved:
        return
    problems = []
    if saved.get("fingerprint") != fingerprint:
        problems.append(f"the prepared data differs (fingerprint {str(saved.get('fingerprint'))[:12]}... -> "
                        f"{fingerprint[:12]}...{'; ' + changes if changes else ''})")
    if saved.get("tokenizer_sha256") and tokenizer_sha256 and saved["tokenizer_sha256"] != tokenizer_sha256:
        problems.append(f"the tokenizer differs (sha256 {saved['tokenizer_sha256'][:12]}... -> {tokenizer_sha256[:12]}...)")
    if problems:
        raise CheckpointError(f"cannot resume {checkpoint}: {'; '.join(problems)}; the weights were trained on the old "
                              f"data; restore it, or {NEW_RUN}")
