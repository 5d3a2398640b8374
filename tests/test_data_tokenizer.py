"""The BPE tokenizer trainer: special tokens, exact round trip, transformers compatibility."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.documents import DocumentReader
from data_pipeline.pieces import split_text
from data_pipeline.sources import resolve_sources
from data_pipeline.tokenizer import SPECIAL_TOKENS
from data_pipeline.tokenizer_files import load_tokenizer, special_token_ids


def random_text(rng: random.Random, length: int) -> str:
    """Random UTF-8: ASCII, Latin, CJK, emoji, combining marks, controls, whitespace runs, special tokens."""
    pools = [
        (0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F),
        (0x300, 0x36F), (0x10000, 0x1000F), (0xE000, 0xE00F),
    ]
    parts = []
    while sum(map(len, parts)) < length:
        choice = rng.random()
        if choice < 0.05:
            parts.append(rng.choice(SPECIAL_TOKENS))
        elif choice < 0.15:
            parts.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n "]))
        else:
            lo, hi = rng.choice(pools)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
    return "".join(parts)


def test_special_tokens_have_fixed_ids(data_tokenizer: Path) -> None:
    tok = load_tokenizer(data_tokenizer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.get_vocab_size() == 1000
    assert special_token_ids(data_tokenizer) == {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0}


def test_decode_encode_round_trip_on_any_utf8(data_tokenizer: Path) -> None:
    tok = load_tokenizer(data_tokenizer)
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng, rng.randint(1, 400))
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    tok.encode_special_tokens = True  # as prepare encodes: special tokens written in text are plain text
    for _ in range(100):
        text = random_text(rng, 200)
        ids = tok.encode(text).ids
        assert 0 not in ids and tok.decode(ids, skip_special_tokens=False) == text


def test_transformers_autotokenizer_loads_it(data_tokenizer: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(data_tokenizer)
    ours = load_tokenizer(data_tokenizer)
    text = "ROMEO:\nBut soft, what light through yonder window breaks? \u00e9\U0001F600"
    assert hf(text)["input_ids"] == ours.encode(text).ids
    assert hf.decode(hf(text)["input_ids"]) == text
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token_id == 0
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_training_learns_the_corpus(data_tokenizer: Path, shakespeare_text: str) -> None:
    tok = load_tokenizer(data_tokenizer)
    ids = tok.encode(shakespeare_text[:20000]).ids
    assert 20000 / len(ids) > 2.0  # 744 merges already compress prose to over 2 characters per token
    assert tok.token_to_id("ROMEO") is not None or tok.token_to_id("ĠROMEO") is not None


def test_cut_pieces_tokenize_like_the_whole(data_tokenizer: Path, shakespeare_text: str) -> None:
    tok = load_tokenizer(data_tokenizer)
    text = shakespeare_text[:200_000]
    pieces = split_text(text, 5000)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert [i for p in pieces for i in tok.encode(p).ids] == tok.encode(text).ids


def test_training_reads_a_bounded_prefix(data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    from data_pipeline.tokenizer import train_tokenizer

    reader = DocumentReader(resolve_sources(str(shakespeare_jsonl)))
    tok = train_tokenizer(reader, vocab_size=300, max_chars=10_000, show_progress=False)
    assert tok.get_vocab_size() <= 300
    total = sum(1 for line in shakespeare_jsonl.read_text().splitlines() if line.strip())
    assert 0 < reader.documents_read < total  # stopped early: the source was never read to its end
    with pytest.raises(ValueError, match="vocab_size must hold"):
        train_tokenizer(reader, vocab_size=100)


def test_training_is_deterministic(tmp_path: Path, shakespeare_jsonl: Path) -> None:
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    for name in ("a", "b"):
        tok = train_tokenizer(DocumentReader(resolve_sources(str(shakespeare_jsonl))), vocab_size=600, show_progress=False)
        save_tokenizer(tok, tmp_path / name)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def _foreign_tokenizer(folder: Path, specials: list[str], config: dict | None) -> Path:
    """A byte-level BPE from elsewhere, with other special tokens (as Llama-style '<s>' / '</s>')."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Tok

    tok = Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the king and the queen walked on the sea shore"] * 50, trainer=trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _cli(args: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from tlm.cli import main

    try:
        main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_an_imported_tokenizer_separates_documents_with_its_own_eos(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from data_pipeline.dataset import TokenRows
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.tokenizer_files import special_token_ids

    src = _foreign_tokenizer(tmp_path / "theirs", ["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"})
    status, out, err = _cli(["tokenizer", "--from", src, "--out", tmp_path / "ours"], capsys)
    assert status == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["separator"] == {"token": "</s>", "id": 2} and figures["bos_token"] == {"token": "<s>", "id": 1}
    assert special_token_ids(tmp_path / "ours")["eos_token_id"] == 2  # the model's ids follow the tokenizer
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"the king {i} walked"}) + "\n" for i in range(40)))
    manifest = prepare(PrepareConfig(data=[str(data)], tokenizer=str(tmp_path / "ours"), out=str(tmp_path / "p"),
                                     seq_len=16, val=0.0), progress=False, num_proc=1)
    rows = TokenRows(tmp_path / "p", "train")
    flat = rows.gather(np.arange(len(rows)))[0].reshape(-1)
    assert manifest["tokenizer"]["eot_token_id"] == 2 and int((flat == 2).sum()) == manifest["splits"]["train"]["documents_in_rows"] > 0

    # A config-less tokenizer with a conventional EOS: imported, and the roles written down.
    bare = _foreign_tokenizer(tmp_path / "bare", ["</s>"], None)
    assert _cli(["tokenizer", "--from", bare, "--out", tmp_path / "ours2"], capsys)[0] == 0
    assert json.loads((tmp_path / "ours2" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_tokenizers_tlm_cannot_use_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    no_eos = _foreign_tokenizer(tmp_path / "noeos", ["<unk>", "<mask>"], {"unk_token": "<unk>"})
    status, _, err = _cli(["tokenizer", "--from", no_eos, "--out", tmp_path / "o1"], capsys)
    assert status == 2 and "has no end-of-text token to separate documents with" in err and len(err.splitlines()) == 1
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text("{}")
    (slow / "merges.txt").write_text("")
    status, _, err = _cli(["tokenizer", "--from", slow, "--out", tmp_path / "o2"], capsys)
    assert status == 2 and "no tokenizer.json: it holds vocab.json, merges.txt (a slow tokenizer)" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
