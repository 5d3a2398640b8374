"""The bytes of a source as stored, opened: decompressed (gzip, xz, zstd, bz2), read in bounded chunks, and
hashed as they are read (so that a fingerprint covers exactly the bytes tokenized and a source changed while it
is read is refused: SourceChanged)."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import zlib
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

from tlm_base.errors import DataError

if TYPE_CHECKING:
    from data_pipeline.sources import Source


READ_CHUNK = 1 << 20  # text files are read at most this many bytes at a time


class SourceChanged(DataError):
    """A source's bytes as read differ from those fingerprinted when prepare started: it changed while read."""


class Tap:
    """The sha256 and count of a file's bytes as they are read (before decompression)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.eof = False

    def position(self) -> tuple[int, str]:
        """(bytes read so far, their sha256)."""
        return self.bytes, self.digest.copy().hexdigest()


class TappedFile(io.RawIOBase):
    """A file whose bytes go through a `Tap` as they are read."""

    def __init__(self, path: str, tap: Tap) -> None:
        self._file = open(path, "rb", buffering=0)
        self._tap = tap

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        n = self._file.readinto(target)
        if n:
            self._tap.digest.update(memoryview(target)[:n])
            self._tap.bytes += n
        elif n == 0 and len(target):
            self._tap.eof = True
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def opened(source: Source, tap: Tap | None) -> Iterator[IO[bytes]]:
    """`open_binary`, with the file's bytes going through `tap` when given (and closed with the stream)."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(io.BufferedReader(TappedFile(source.path, tap), READ_CHUNK)) if tap is not None else None
        yield stack.enter_context(open_binary(source, raw))


def sha256_prefix(path: str, size: int) -> str:
    """sha256 of the first `size` bytes of a file (fewer when it is shorter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while size > 0 and (block := f.read(min(size, 1 << 22))):
            digest.update(block)
            size -= len(block)
    return digest.hexdigest()


def open_binary(source: Source, raw: IO[bytes] | None = None) -> IO[bytes]:
    """The file's decompressed bytes, as a stream (read from `raw`, the file already open, when given: the caller
    closes it)."""
    if source.compression == "gzip":
        return gzip.open(raw if raw is not None else source.path, "rb")
    if source.compression == "xz":
        return lzma.open(raw if raw is not None else source.path, "rb")
    if source.compression == "bz2":
        return bz2.open(raw if raw is not None else source.path, "rb")
    if source.compression == "zstd":
        return io.BufferedReader(_ZstdReader(raw if raw is not None else open(source.path, "rb")), READ_CHUNK)
    return raw if raw is not None else open(source.path, "rb")


class _ZstdReader(io.RawIOBase):
    """zstd frames, one after another, as a stream that raises EOFError when the file ends inside a frame
    (zstandard's own stream reader returns a truncated file's data, or nothing, without a word)."""

    def __init__(self, file: IO[bytes], chunk: int = 1 << 20) -> None:
        import zstandard

        self._zstd = zstandard
        self._file = file
        self._chunk = chunk
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._buffer, self._offset = b"", 0
        self._in_frame = False  # input consumed since the last complete frame
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while self._offset >= len(self._buffer) and not self._done:
            data = self._file.read(self._chunk)
            if not data:
                if self._in_frame:
                    raise EOFError("the zstd stream ends inside a frame: the file is truncated")
                self._done = True
                break
            self._buffer, self._offset = b"", 0
            while data:
                self._in_frame = True
                self._buffer += self._dobj.decompress(data)
                data = b""
                if self._dobj.eof:  # a frame ended: what follows is the next frame
                    data = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
        n = min(len(target), len(self._buffer) - self._offset)
        target[:n] = self._buffer[self._offset:self._offset + n]
        self._offset += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError,
                                                          zlib.error)


def decompression_error(source: Source, lineno: int, e: BaseException) -> DataError | None:
    """The one line for corrupt or truncated compressed data (None: not such an error)."""
    if isinstance(e, DECOMPRESSION_ERRORS):
        return DataError(f"{source.path}: corrupt or truncated {source.compression or 'file'} data after line "
                         f"{lineno} ({type(e).__name__}: {e})")
    if type(e).__name__ == "ZstdError":  # zstandard raises its own ZstdError
        return DataError(f"{source.path}: corrupt or truncated zstd data after line {lineno} ({e})")
    return None
