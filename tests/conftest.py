"""Shared fixtures. Tests never touch the network: the Hugging Face hub is switched off here."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import synthetic_text  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (512 tokens, <|endoftext|> = id 0) saved as transformers expects it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_text(2000), trainer=trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 32768,
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    import lzma

    from data_pipeline import TINYSHAKESPEARE

    return lzma.open(TINYSHAKESPEARE, "rt", encoding="utf-8").read()


@pytest.fixture(scope="session")
def data_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tlm's own tokenizer trainer on the bundled Shakespeare (1000 tokens, to stay quick)."""
    from data_pipeline import TINYSHAKESPEARE
    from data_pipeline.documents import DocumentReader
    from data_pipeline.sources import resolve_sources
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(DocumentReader(resolve_sources(str(TINYSHAKESPEARE))), vocab_size=1000, show_progress=False)
    return save_tokenizer(tok, tmp_path_factory.mktemp("data_tokenizer"))


@pytest.fixture(scope="session")
def shakespeare_jsonl(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """The Shakespeare text as a JSONL corpus: one document per speech (blank-line separated)."""
    speeches = [p for p in shakespeare_text.split("\n\n") if p.strip()]
    path = tmp_path_factory.mktemp("jsonl") / "speeches.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(speeches):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path, shakespeare_jsonl: Path) -> Path:
    """The Shakespeare speeches prepared with the test tokenizer (packed rows of 64 tokens, 5% validation):
    the data of every short training run in the tests (read only; copy it before tampering)."""
    from data_pipeline.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(PrepareConfig(data=[str(shakespeare_jsonl)], tokenizer=str(data_tokenizer), out=str(out), seq_len=64,
                          val=0.05), progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> Path:
    """The debug recipe trained to its end through the CLI: 8 steps, checkpoints at 4 and 8 (keep_last 2). Tests
    copy it before changing anything."""
    from hostile import call_main, train_args

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert call_main(train_args(prepared, run_dir)) == 0
    return run_dir
