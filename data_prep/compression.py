"""Open an input file as a binary stream, decompressing ``.gz`` ``.bz2`` ``.xz`` ``.zst`` transparently.

The codec is chosen by the file's magic bytes (a wrong extension still works); archive formats we
cannot read as one text stream (zip, tar, 7z, PDF...) are refused with a message naming them.
A truncated archive raises EOFError at the point where its data ends, for every codec.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path

from data_prep.errors import InputError

CODEC_MAGIC = [
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
]
UNSUPPORTED_MAGIC = [
    (b"PK\x03\x04", "a zip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"%PDF", "a PDF document"),
    (b"Rar!", "a RAR archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\x7fELF", "an executable (ELF)"),
]
EXTENSION_CODEC = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".lzma": "xz", ".zst": "zstd"}
READ_CHUNK = 1 << 16  # small enough that a truncated archive loses little of the text before the damage


def codec_errors() -> tuple:
    """Exception types a decoder raises on truncated or corrupt data."""
    import zstandard

    return (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError)


class _ZstdRaw(io.RawIOBase):
    """Streaming zstd decoder that, unlike zstandard.stream_reader, notices a truncated frame."""

    def __init__(self, fileobj):
        import zstandard

        self._zstd = zstandard
        self._src = fileobj
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._pending:
            data = self._src.read(READ_CHUNK)
            if not data:
                if self._in_frame:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            self._feed(data)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, data: bytes) -> None:
        out = []
        while data:
            self._in_frame = True
            out.append(self._dobj.decompress(data))
            if not self._dobj.eof:
                break
            # A frame ended: the rest belongs to the next frame (zstd files may hold several).
            data = self._dobj.unused_data
            self._dobj = self._zstd.ZstdDecompressor().decompressobj()
            self._in_frame = False
        self._pending += b"".join(out)

    def close(self):
        self._src.close()
        super().close()


def sniff_codec(path: Path, head: bytes) -> str | None:
    for magic, codec in CODEC_MAGIC:
        if head.startswith(magic):
            return codec
    for magic, what in UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise InputError(path, None, f"unsupported input format: this is {what}; expected plain text, JSONL, "
                             "WikiExtractor or MediaWiki XML, optionally .gz/.bz2/.xz/.zst compressed",
                             reason="unknown_format")
    if len(head) > 262 and head[257:262] == b"ustar":
        raise InputError(path, None, "unsupported input format: this is a tar archive; extract it first",
                         reason="unknown_format")
    return None


def open_binary(path: Path) -> io.BufferedIOBase:
    """A buffered binary stream of the decompressed content of ``path``."""
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise InputError(path, None, f"cannot open: {err.strerror or err}", reason="unreadable") from err
    head = raw.read(512)
    raw.seek(0)
    try:
        codec = sniff_codec(path, head)
    except InputError:
        raw.close()
        raise
    expected = EXTENSION_CODEC.get(path.suffix.lower())
    if expected and codec != expected:
        raw.close()
        found = f"{codec} data" if codec else "no compressed data (not a valid archive header)"
        raise InputError(path, None, f"the name says {expected} but the file holds {found}",
                         reason="truncated_archive")
    if codec == "gzip":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw), READ_CHUNK)
    if codec == "bzip2":
        return io.BufferedReader(bz2.BZ2File(raw), READ_CHUNK)
    if codec == "xz":
        return io.BufferedReader(lzma.LZMAFile(raw), READ_CHUNK)
    if codec == "zstd":
        return io.BufferedReader(_ZstdRaw(raw), READ_CHUNK)
    return io.BufferedReader(raw, READ_CHUNK)


def codec_error_message(err: Exception) -> str:
    """Describe a decompression failure (truncated or corrupt archive) in words."""
    if isinstance(err, EOFError):
        return "truncated archive: the compressed data ends before its end-of-stream marker"
    return f"corrupt archive: {err}"
