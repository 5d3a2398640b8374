"""Tokenizer files that travel with a model directory, read through the `tokenizers` library.

A model directory (or an HF export) carries `tokenizer.json` plus, when the tokenizer was saved for
transformers, `tokenizer_config.json` and `special_tokens_map.json`. Special token ids are looked up
from those files, or from the conventional names when they are absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tokenizers import Tokenizer

from tlm_base.errors import CheckpointError
from tlm_base.schema import Schema, StrictStr, load_json_text, parse

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Names tried, in order, when tokenizer_config.json does not say which token plays a role.
CONVENTIONAL = {
    "eos": ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>"),
    "bos": ("<|im_start|>", "<s>", "<bos>"),
    "pad": ("<|padding|>", "<pad>", "<|endoftext|>"),
}


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / "tokenizer.json").is_file()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files found in `src` into `dst`; refuse a folder without tokenizer.json."""
    if not has_tokenizer(src):
        raise CheckpointError(f"tokenizer folder '{src}' has no tokenizer.json")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The fast tokenizer stored in `path`/tokenizer.json."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"'{path}' has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"{file}: cannot load tokenizer ({e})") from None


class TokenEntry(Schema):
    content: StrictStr


class SpecialTokensFile(Schema):
    """tokenizer_config.json / special_tokens_map.json: the special tokens are names (or {"content": name})."""

    bos_token: StrictStr | TokenEntry | None = None
    eos_token: StrictStr | TokenEntry | None = None
    pad_token: StrictStr | TokenEntry | None = None
    unk_token: StrictStr | TokenEntry | None = None


def _token_text(value: object) -> str | None:
    # tokenizer_config.json stores a special token as a string or as {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_token_ids(path: str | Path, tokenizer: Tokenizer | None = None) -> dict[str, int | None]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} for the tokenizer in `path` (None when absent)."""
    tokenizer = tokenizer or load_tokenizer(path)
    declared: dict[str, object] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = Path(path) / name
        if file.is_file():
            data = load_json_text(file, CheckpointError)
            parse(SpecialTokensFile, data, str(file), CheckpointError)
            for role in ("bos", "eos", "pad"):
                if f"{role}_token" in data:
                    declared.setdefault(role, data[f"{role}_token"])
    ids: dict[str, int | None] = {}
    for role in ("bos", "eos", "pad"):
        # A role the config states (even as null) is taken as stated; conventional names are only
        # tried for roles it does not mention.
        candidates = [_token_text(declared[role])] if role in declared else list(CONVENTIONAL[role])
        ids[f"{role}_token_id"] = next(
            (tokenizer.token_to_id(t) for t in candidates if t and tokenizer.token_to_id(t) is not None), None
        )
    return ids


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> the byte it stands for (printable bytes map to themselves,
    the others to the characters from U+0100 up, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """The UTF-8 bytes each token id stands for (0 for special tokens such as <|endoftext|>), so that the bytes a
    span of ids decodes to is the sum over its ids, even where a character is split across tokens. Byte-level
    vocabularies are read through their alphabet; others through decoding each id alone (a byte-fallback token
    `<0xNN>` counts 1; a decoder that drops a word's leading space when the id stands alone undercounts it)."""
    alphabet = _byte_level_alphabet() if type(tokenizer.decoder).__name__ == "ByteLevel" else {}
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for i in range(len(lengths)):
        token = tokenizer.id_to_token(i)
        if token is None or i in special:
            continue
        if alphabet and all(c in alphabet for c in token):
            lengths[i] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            lengths[i] = 1
        else:
            lengths[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths
