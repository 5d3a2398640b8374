"""Cross-entropy of the output projection, optionally in chunks that never hold the whole batch's logits.

The standard path computes logits for every token at once (batch x seq x vocab: 32 x 512 x 6400 in fp32
is 420 MB, plus its gradient). The chunked path runs the projection and the loss `chunk` tokens at a time
under activation checkpointing: forward keeps no logits, backward recomputes one chunk's logits at a time.
Peak logit memory drops from N x V to chunk x V for one extra projection's worth of compute. The
projection is called as a module (not through its weight), so ZeRO-3 and FSDP2 gather it as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    losses = F.cross_entropy(project(hidden).float(), labels, reduction="none")
    return (losses * mask.to(losses.dtype)).sum() if mask is not None else losses.sum()


def cross_entropy_sum(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                      loss_mask: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
    """Sum over counted tokens of -log softmax(project(hidden))[label], in fp32 (chunk = 0: all at once)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    mask = None if loss_mask is None else loss_mask.reshape(-1)
    if chunk <= 0 or chunk >= hidden.shape[0]:
        return _chunk_loss(project, hidden, labels, mask)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss, project, hidden[part], labels[part],
                                   None if mask is None else mask[part], use_reentrant=False)
    return total
