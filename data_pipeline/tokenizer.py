"""Train the byte-level BPE tokenizer with `tokenizers`, from a streamed source.

Special tokens (ids 0, 1, 2, fixed so that every tokenizer tlm trains agrees on them):
- `<|endoftext|>` (0): the document separator of packed pretraining rows, the EOS that stops generation,
  and the padding of no-pack rows (padding is masked out of the loss, so sharing the id costs nothing).
- `<|im_start|>` (1) and `<|im_end|>` (2): ChatML turn markers, as the original project's tokenizer has,
  so that a later chat / SFT corpus is tokenized without growing the vocabulary or the embeddings.

Byte-level pre-tokenization with the full 256-byte initial alphabet and no normaliser makes
decode(encode(x)) == x for every UTF-8 string. Training streams documents through
`train_from_iterator`, so memory grows with the number of distinct pre-tokens, not the corpus size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.documents import DocumentReader

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOT = SPECIAL_TOKENS[0]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: GPT-2 pre-tokenization, no prefix space, byte-level decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    reader: DocumentReader,
    vocab_size: int = 6400,
    min_frequency: int = 2,
    max_chars: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train on the documents of `reader` (at most `max_chars` characters when given)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )

    def texts() -> Iterator[str]:
        seen = 0
        for doc in reader.documents():
            yield doc.text
            seen += len(doc.text)
            if max_chars is not None and seen >= max_chars:
                return

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, f"special token {token} must have id {i}"
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int = 32768) -> Path:
    """Write tokenizer.json plus the files `transformers.AutoTokenizer.from_pretrained` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": EOT, "pad_token": EOT, "additional_special_tokens": list(SPECIAL_TOKENS[1:])}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def tokenizer_sha256(tokenizer_dir: str | Path) -> str:
    """The identity of a tokenizer: sha256 of its tokenizer.json."""
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()


def train_and_save(out: str, data: Any = None, vocab_size: int = 6400, text_field: str = "text",
                   sample_by: str = "document", on_error: str = "raise", max_chars: int | None = None,
                   min_frequency: int = 2, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """`tlm tokenizer`: train a BPE on DATA (default: the bundled corpus) into OUT; the figures it prints."""
    import logging
    import time

    from data_pipeline import default_data
    from tlm_base.errors import CheckpointError
    from tlm_base.fileio import check_output_folder
    from tlm_base.locks import FolderLock
    from data_pipeline.sources import resolve_sources

    log = logging.getLogger("tlm")
    data = default_data(data)[0]
    check_output_folder(out, "tokenizer output", "--out")  # a file in its place or above it, a long name, /proc
    if (Path(out) / "tokenizer.json").exists() and not overwrite:
        raise CheckpointError(f"'{out}' already holds a tokenizer; pass --overwrite to replace it")
    reader = DocumentReader(resolve_sources(data), text_field=text_field, sample_by=sample_by, on_error=on_error)
    start = time.perf_counter()
    with FolderLock(out, "tokenizer output", hint="wait for that `tlm tokenizer` to finish, or choose another --out"):
        trained = train_tokenizer(reader, vocab_size=vocab_size, min_frequency=min_frequency, max_chars=max_chars,
                                  show_progress=progress)
        save_tokenizer(trained, out)
    seconds = time.perf_counter() - start
    if reader.skips.total():
        log.warning("skipped %d records: %s", reader.skips.total(), reader.skips.to_dict()["by_reason"])
    log.info("trained a %d-token BPE in %.1f s -> %s", trained.get_vocab_size(), seconds, out)
    return {"out": out, "vocab_size": trained.get_vocab_size(), "special_tokens": list(SPECIAL_TOKENS),
            "sha256": tokenizer_sha256(out), "documents": reader.documents_read, "skipped": reader.skips.to_dict(),
            "seconds": round(seconds, 2)}


SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "spiece.model")


def import_tokenizer(src: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """`tlm tokenizer --from DIR`: take another project's tokenizer (a tokenizer.json, with its transformers config
    files when present) into OUT, after checking that tlm can use it: it loads, and it has an end-of-text token
    to separate documents with (`<|endoftext|>`, else the eos_token its config names, else a conventional EOS).
    The model's bos / eos / pad ids are then taken from it, as from a tokenizer tlm trained."""
    from tlm_base.errors import DataError
    from tlm_base.locks import FolderLock
    from data_pipeline.tokenizer_files import copy_tokenizer_files, load_tokenizer, special_token_ids

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"--from '{src}' is not a folder (give the folder holding tokenizer.json)")
    if not (src / "tokenizer.json").is_file():
        slow = [n for n in SLOW_TOKENIZER_FILES if (src / n).is_file()]
        hint = (f": it holds {', '.join(slow)} (a slow tokenizer); write tokenizer.json with transformers: "
                f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)" if slow else "")
        raise DataError(f"--from '{src}' has no tokenizer.json{hint}")
    tokenizer = load_tokenizer(src)
    ids = special_token_ids(src, tokenizer)
    name = separator_token(tokenizer, src)  # what prepare will separate documents with
    separator = None if name is None else tokenizer.token_to_id(name)
    if separator is None:
        raise DataError(f"'{src / 'tokenizer.json'}' has no end-of-text token to separate documents with (no "
                        f"{EOT}, and its config names no eos_token that is in the vocabulary); add one as a special "
                        "token, or set eos_token in tokenizer_config.json, and import again")
    if src.resolve() == out.resolve():
        raise DataError(f"--from and --out are the same folder '{out}'")
    if (out / "tokenizer.json").exists() and not overwrite:
        raise DataError(f"'{out}' already holds a tokenizer; pass --overwrite to replace it")
    with FolderLock(out, "tokenizer output", hint="wait for that `tlm tokenizer` to finish, or choose another --out"):
        copied = copy_tokenizer_files(src, out)
        if "tokenizer_config.json" not in copied:  # state the roles, so that every reader maps the same ids
            roles = {f"{role}_token": tokenizer.id_to_token(ids[f"{role}_token_id"])
                     for role in ("bos", "eos", "pad") if ids[f"{role}_token_id"] is not None}
            (out / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", **roles}, indent=2) + "\n")
    return {"out": str(out), "from": str(src), "vocab_size": tokenizer.get_vocab_size(),
            "separator": {"token": tokenizer.id_to_token(separator), "id": separator},
            **{f"{role}_token": None if ids[f"{role}_token_id"] is None else
               {"token": tokenizer.id_to_token(ids[f"{role}_token_id"]), "id": ids[f"{role}_token_id"]}
               for role in ("bos", "eos", "pad")},
            "sha256": tokenizer_sha256(out)}


def separator_token(tokenizer: Tokenizer, tokenizer_dir: str | Path) -> str | None:
    """The token that ends a document: <|endoftext|>, else the tokenizer's EOS (an imported tokenizer)."""
    from data_pipeline.tokenizer_files import special_token_ids

    if tokenizer.token_to_id(EOT) is not None:
        return EOT
    eos = special_token_ids(tokenizer_dir, tokenizer)["eos_token_id"]
    return None if eos is None else tokenizer.id_to_token(eos)
