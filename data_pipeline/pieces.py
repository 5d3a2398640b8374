"""Text cut into pieces for the tokenizer, at line or space boundaries where the text has them, so that a long
document is tokenized in bounded pieces that give the tokens of the whole."""

from __future__ import annotations

import re

# Pieces of one document are cut near this many characters (see `split_text`).
PIECE_CHARS = 1 << 17


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


_SAFE_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")


def _cut(text: str, start: int, piece_chars: int) -> int:
    """Where the piece of `text` that starts at `start` ends (see `split_text`); reads text[:start + 1.25 x
    piece_chars] only."""
    window_end = start + piece_chars
    lo, hi = window_end - piece_chars // 4, window_end + piece_chars // 4
    match = _SAFE_CUT.search(text, lo, hi) or _SAFE_SPACE_CUT.search(text, lo, hi)
    return match.start() if match else window_end


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at most about 1.25 x `piece_chars` characters whose separate tokenization
    equals the tokenization of the whole.

    A byte-level BPE never merges across pre-tokens. The GPT-2 pre-tokenizer always ends a pre-token at a
    newline that has non-space characters on both sides ('x\ny'), and before a single space between two
    non-space characters ('x y': ' y' starts the next one). Cuts go right after such a newline, else right
    before such a space, so piece-wise token ids are exactly the whole text's. Only a stretch of
    `piece_chars` characters with neither (no whitespace at all: binary noise, a minified blob) is cut
    blindly, where one token may differ; memory stays bounded whatever the input.
    """
    if len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _cut(text, start, piece_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class Pieces:
    """A document that arrives in fragments (a text file read in chunks), cut into exactly the pieces
    `split_text` cuts the whole into, holding at most about 1.25 x piece_chars characters plus one fragment."""

    def __init__(self, piece_chars: int) -> None:
        self.piece_chars = piece_chars
        self.text = ""

    def add(self, text: str) -> list[str]:
        """The pieces that this fragment completes."""
        if not text:
            return []
        self.text = self.text + text if self.text else text
        window = self.piece_chars + self.piece_chars // 4  # a cut depends on this many characters from its start
        pieces, start = [], 0
        while len(self.text) - start > window:
            cut = _cut(self.text, start, self.piece_chars)
            pieces.append(self.text[start:cut])
            start = cut
        if start:
            self.text = self.text[start:]
        return pieces

    def end(self) -> list[str]:
        """The document's last pieces."""
        pieces, self.text = split_text(self.text, self.piece_chars), ""
        return pieces
