"""The chunked cross-entropy: same loss and gradients as the standard path, without whole-batch logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import debug_config
from tlm.model.transformer import TransformerLM


def loss_and_grads(model: TransformerLM, ids: torch.Tensor, mask: torch.Tensor | None, chunk: int):
    model.zero_grad()
    loss = model(ids[:, :-1], labels=ids[:, 1:], loss_mask=mask, loss_chunk=chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 37, 64, 10_000])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_standard(chunk: int, masked: bool) -> None:
    model = TransformerLM(debug_config())
    ids = torch.randint(0, 6400, (3, 41))
    mask = (torch.rand(3, 40) > 0.3) if masked else None
    reference, reference_grads = loss_and_grads(model, ids, mask, 0)
    loss, grads = loss_and_grads(model, ids, mask, chunk)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-5)
    for name, grad in grads.items():
        # fp32 sums in another order: gradients of magnitude ~1-10 agree to ~1e-5
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=3e-5, msg=name)
    logits = model(ids[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    if mask is not None:
        expected = expected * mask.flatten()
    torch.testing.assert_close(reference, expected.sum(), rtol=1e-6, atol=1e-5)


def test_chunked_path_never_saves_whole_batch_logits() -> None:
    model = TransformerLM(debug_config())
    ids = torch.randint(0, 6400, (4, 65))
    tokens, vocab = 4 * 64, 6400

    def largest_saved(chunk: int) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model(ids[:, :-1], labels=ids[:, 1:], loss_chunk=chunk)
        return max(sizes)

    assert largest_saved(0) >= tokens * vocab  # the standard path keeps the whole logits for backward
    assert largest_saved(32) < 32 * vocab + 1  # the chunked one at most one chunk's worth
