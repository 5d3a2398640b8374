"""Document masking for packed rows: the mask and positions, a packed row scored as its documents alone, and a
training run with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.stream import document_masks
from tlm.model.config import get_preset
from tlm.model.transformer import TransformerLM
from tlm.training.config import load_config
from tlm.training.trainer import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EOT = 0


def test_masks_and_positions_follow_the_separators() -> None:
    ids = torch.tensor([[5, 6, EOT, 7, 8, 9, EOT, 4]])
    out = document_masks(ids, EOT, restart_positions=True)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    mask = out["attention_mask"][0, 0]
    assert mask[2].tolist() == [True, True, True, False, False, False, False, False]  # a separator ends its document
    assert mask[5].tolist() == [False, False, False, True, True, True, False, False]
    assert mask[7].tolist() == [False] * 7 + [True]
    assert "position_ids" not in document_masks(ids, EOT, restart_positions=False)


@pytest.mark.parametrize("position_embedding", ["rope", "nope"])
@pytest.mark.parametrize("restart", [False, True], ids=["mask", "mask_positions"])
def test_a_packed_row_scores_each_document_as_if_alone(position_embedding: str, restart: bool) -> None:
    torch.manual_seed(0)
    model = TransformerLM(get_preset("debug", position_embedding=position_embedding)).eval()
    docs = [torch.randint(3, 6400, (n,)).tolist() + [EOT] for n in (7, 12, 5)]
    row = torch.tensor([[t for d in docs for t in d]])
    masks = document_masks(row, EOT, restart)
    with torch.no_grad():
        packed = model(row, **masks)
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc]))
            torch.testing.assert_close(packed[0, start:start + len(doc)], alone[0], atol=2e-5, rtol=1e-4)
            start += len(doc)
        unmasked = model(row)
    assert not torch.allclose(unmasked[0, 8:20], packed[0, 8:20], atol=1e-3)  # without the mask it differs


def test_training_with_document_masking(tmp_path: Path, prepared: Path) -> None:
    base = {"data.prepared": str(prepared), "logging.wandb": "disabled", "logging.sample_prompt": None,
            "train.max_steps": 3, "eval.every": 3, "eval.max_batches": 1, "train.precision": "fp32"}
    runs = {}
    for mode in ("none", "mask", "mask_positions"):
        summary = train(load_config(CONFIGS / "debug.yaml", {**base, "logging.run_dir": str(tmp_path / mode),
                                                            "train.document_masking": mode}))
        records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = [r["loss"] for r in records if "loss" in r]
        assert summary["val_loss"] > 0
    assert runs["none"][0] != runs["mask"][0]  # the mask is applied from the first step
    with pytest.raises(Exception, match="document_masking=mask is for packed rows"):
        load_config(CONFIGS / "debug.yaml", {"train.document_masking": "mask", "data.pack": False})
