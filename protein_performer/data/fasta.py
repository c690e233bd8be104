"""Streaming FASTA reader: byte-level, buffered, plain or gzip (BGZF too), bounded memory.

The reader never looks at single characters in Python. It reads blocks of ``block_size`` bytes
(1 MiB: small enough for the block's few passes to stay in the CPU cache), cuts them at the last
record boundary (``b"\\n>"``), and splits the complete part into headers and bodies with one
``re.split``; a record's sequence is its body with newlines, ``\\r``, spaces and tabs removed by
one ``bytes.translate`` call. Line numbers and offsets are NumPy cumulative sums of lengths.
Records are handed out in :class:`Batch` es (one per block), which is what ingestion consumes;
:func:`read_fasta` gives one :class:`FastaRecord` at a time.

Each record carries its header (without ``>``), its raw sequence bytes (case and a trailing ``*``
kept: the tokenizer deals with both), the 1-based line number of its header and the byte offset
of its ``>`` in the (decompressed) stream.

``start`` / ``end`` restrict reading to the records whose ``>`` lies in the byte range
``[start, end)`` of an uncompressed file; consecutive ranges partition the records of a file
exactly, which is how ``part=i num_parts=n`` ingestion splits one big file across jobs. Line
numbers are then counted from the first record of the range (``line0`` sets the base).

A gzip input is inflated by ``zlib`` in a read-ahead thread (gzip_stream.py; zlib releases the GIL), so the
decompression of the next blocks overlaps the parsing of the current one.

Text encodings. A header is any bytes up to the end of its line: the reader never decodes it.
:func:`decode_header` turns it into text for the ids and messages: UTF-8 when the bytes are valid
UTF-8 (the usual case, and every ASCII header), otherwise Windows-1252 as web browsers read it
(the WHATWG encoding standard: Latin-1's letters plus curly quotes, dashes and the euro sign in
0x80-0x9f; the five bytes Windows-1252 leaves undefined are read as Latin-1). That decoding never
fails and loses nothing: every byte maps to its own character. A UTF-8 byte-order mark at the start
of the file is skipped. Non-ASCII bytes in a *sequence* line are not residues: the record is
rejected by ingestion (``invalid_character``), the rest of the file is read.

Bad input raises :class:`FastaFormatError`, which names the file (and the line where it applies):
data before the first ``>`` (not FASTA); binary content: a NUL byte anywhere (checked per block,
one ``memchr``), a large share of control bytes in the first block, a file compressed with another
tool than gzip, UTF-16/32 text; an empty file; a truncated or corrupt gzip stream.
"""

from __future__ import annotations

import codecs
import gzip
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from protein_performer.data.gzip_stream import GZIP_MAGIC, ThreadedGzipReader, is_gzip, open_binary
from protein_performer.errors import UserError

_WHITESPACE = b"\n\r \t\v\f"
DEFAULT_BLOCK_SIZE = 1 << 20  # 1 MiB: a block's several passes stay in L2 (4 MiB was ~20% slower)


class FastaFormatError(UserError, ValueError):
    """The input is not a readable FASTA file. ``path`` and ``line`` (1-based, or None) say where."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable across worker processes
        return (self.__class__, (self.path, self.message, self.line))


_UTF8_BOM = b"\xef\xbb\xbf"
# bytes that no text file holds, except NUL (always binary, checked on its own): C0 controls other
# than tab, newline, vertical tab, form feed and carriage return, and DEL
_CONTROL = bytes([*range(1, 9), *range(14, 32), 127])
_CONTROL_RE = re.compile(b"[" + re.escape(_CONTROL) + b"]")
BINARY_CONTROL_SHARE = 0.05  # more control bytes than this in the first block: binary (text has ~0)
_MAGIC = (  # other compressed or binary formats, named in the message
    (b"BZh", "bzip2-compressed: decompress it (`bunzip2 -k`) or recompress it with gzip"),
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it (`unxz -k`) or recompress it with gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it (`unzstd`) or recompress it with gzip"),
    (b"PK\x03\x04", "a zip archive: unzip it and give the FASTA file inside"),
    (b"\x89HDF", "an HDF5 file (shards?): give the FASTA file"),
    (b"\xff\xfe", "UTF-16/32 text: save it as UTF-8 or ASCII (`iconv -f UTF-16 -t UTF-8`)"),
    (b"\xfe\xff", "UTF-16/32 text: save it as UTF-8 or ASCII (`iconv -f UTF-16 -t UTF-8`)"),
)
_FALLBACK_ERRORS = "protein_performer.latin1"


def _latin1_for_undefined(e: UnicodeDecodeError) -> tuple[str, int]:
    # the five bytes Windows-1252 leaves undefined (0x81 0x8d 0x8f 0x90 0x9d) read as Latin-1, as
    # the WHATWG "windows-1252" decoder does: every byte then has a character
    return "".join(map(chr, e.object[e.start : e.end])), e.end


codecs.register_error(_FALLBACK_ERRORS, _latin1_for_undefined)


def decode_header(raw: bytes) -> str:
    """Text of a header (or an id from it): UTF-8 when valid, else Windows-1252 (Latin-1 for its
    five undefined bytes). Never fails; distinct bytes give distinct text."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", _FALLBACK_ERRORS)


def decode_ids(blob: bytes, sep: bytes = b"\n") -> list[str]:
    """``blob.split(sep)`` decoded with :func:`decode_header`: one decode of the whole blob when it
    is valid UTF-8 (the usual case), one per id only otherwise."""
    try:
        return blob.decode("utf-8").split(sep.decode())
    except UnicodeDecodeError:
        return [decode_header(b) for b in blob.split(sep)]


@dataclass
class FastaRecord:
    header: bytes  # header line without '>' and line terminator
    sequence: bytes  # residues, whitespace removed, case and trailing '*' kept
    line: int  # 1-based line number of the header
    offset: int  # byte offset of '>' in the decompressed stream

    @property
    def header_text(self) -> str:
        """The header as text (see :func:`decode_header`)."""
        return decode_header(self.header)

    @property
    def has_sequence_lines(self) -> bool:
        """False for a header followed by no sequence line (or only blank ones)."""
        return bool(self.sequence)


@dataclass
class Batch:
    """The records of one block, as parallel lists (cheap to build, cheap to consume)."""

    headers: list[bytes] = field(default_factory=list)
    sequences: list[bytes] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    end_offset: int = 0  # offset of the first record not in this batch (where to resume)
    end_line: int = 1  # line number of that record's header
    bytes_read: int = 0  # bytes of input consumed since the previous batch
    block: bytes = b""  # the text the records were cut from
    block_offset: int = 0  # its stream offset

    def raw_sequence(self, i: int) -> bytes:
        """Record ``i``'s sequence bytes as in the file (whitespace removed, no translation)."""
        a = self.offsets[i] - self.block_offset
        b = (self.offsets[i + 1] if i + 1 < len(self.offsets) else self.end_offset) - self.block_offset
        return self.block[a:b].partition(b"\n")[2].translate(None, _WHITESPACE)

    def __len__(self) -> int:
        return len(self.headers)


def _gzip_error(path, e: BaseException) -> FastaFormatError:
    return FastaFormatError(
        path,
        f"truncated or corrupt gzip stream ({type(e).__name__}: {e}). The file is incomplete: "
        "download or compress it again (check it with `gzip -t`); nothing was ingested from it.",
    )


def _binary_error(path, block: bytes, pos: int, line0: int, what: str) -> FastaFormatError:
    line = line0 + block.count(b"\n", 0, pos)
    return FastaFormatError(
        path,
        f"binary content ({what}): not a FASTA text file, or a damaged one. Give a plain or "
        "gzip-compressed FASTA file (if this one was cut short or zero-filled by a failed copy, "
        "copy or download it again).",
        line=line,
    )


def _check_nul(path, buf: bytes, new: int, line0: int) -> None:
    """A NUL byte anywhere makes the file binary. ``buf`` starts at line ``line0``; only its last
    ``new`` bytes (just read) are searched: one ``memchr`` per read, cheap."""
    i = buf.find(b"\x00", len(buf) - new)
    if i >= 0:
        raise _binary_error(path, buf, i, line0, "a NUL byte")


def _check_head(path, head: bytes, line0: int = 1) -> None:
    """Reject binary and non-FASTA content from the first block of a file (start of stream only).

    Binary: a known magic number (other compression tools, HDF5, UTF-16), a NUL byte, or more
    than :data:`BINARY_CONTROL_SHARE` control bytes; all judged on the whole first block,
    headers and sequence lines alike. Bytes >= 0x80 are text (headers in UTF-8, Latin-1, ...).
    """
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise FastaFormatError(path, f"binary content, not a FASTA text file: {what}.", line=1)
    i = head.find(b"\x00")
    if i >= 0:
        raise _binary_error(path, head, i, line0, "a NUL byte")
    n_control = len(head) - len(head.translate(None, _CONTROL))
    if n_control > BINARY_CONTROL_SHARE * len(head):
        m = _CONTROL_RE.search(head)
        share = f"{n_control} control bytes in the first {len(head)} bytes"
        raise _binary_error(path, head, m.start() if m else 0, line0, share)
    stripped = head.lstrip(_WHITESPACE)
    if stripped and not stripped.startswith(b">"):
        line = line0 + head[: len(head) - len(stripped)].count(b"\n")
        first = decode_header(stripped.split(b"\n", 1)[0][:60])
        raise FastaFormatError(
            path,
            f"not FASTA: data before the first '>' header ({first!r}). A FASTA file starts with "
            "a '>' header line; check that this is the right file.",
            line=line,
        )


def iter_batches(
    path: str | os.PathLike,
    start: int = 0,
    end: int | None = None,
    line0: int = 1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    table: bytes | None = None,
) -> Iterator[Batch]:
    """Yield the records of ``path`` whose ``>`` lies in ``[start, end)``, one :class:`Batch` per block.

    ``start`` must be 0 for a gzip file unless it is a record start returned earlier as
    ``Batch.end_offset`` (resuming): gzip streams can only be skipped, not split. ``line0`` is the
    line number given to the first record (1 when reading from the start of the file).

    ``table`` (256 bytes, as for :meth:`bytes.translate`) maps each sequence byte while the
    whitespace is removed, in the same C pass (ingestion maps residues to token ids this way).
    Each batch keeps its ``block`` so that :meth:`Batch.raw_sequence` can give a record's
    original bytes back (to report an invalid character).
    """
    path = Path(path)
    fh = ThreadedGzipReader(path) if is_gzip(path) else open(path, "rb", buffering=0)
    try:
        yield from _iter_batches(fh, path, start, end, line0, block_size, table)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _gzip_error(path, e) from None
    finally:
        fh.close()


def _read(fh: BinaryIO, n: int) -> bytes:
    # A raw (unbuffered) file may return short reads; gzip returns up to n.
    return fh.read(n)


def _seek_record_start(fh, path, start: int, block_size: int, line0: int) -> tuple[bytes, int] | None:
    """Read from the first record start at or after ``start`` (a '>' preceded by '\\n'): the bytes
    read from there and their stream offset; None when no record starts in the rest of the file."""
    fh.seek(start - 1)
    pos = start - 1
    buf = b""
    while True:
        more = _read(fh, block_size)
        buf += more
        i = buf.find(b"\n>")
        if i >= 0:
            buf = buf[i + 1 :]
            pos += i + 1
            break
        if not more:
            return None
        keep = buf[-1:]
        pos += len(buf) - 1
        buf = keep
    _check_nul(path, buf, len(buf), line0)
    return buf, pos


def _start_of_file(fh, path, block_size: int, line0: int) -> tuple[bytes, int, int]:
    """Read the head of the file, check it (empty, binary, not FASTA) and skip a byte-order mark and
    leading blank lines: the bytes from the first '>', their offset and the line they start on."""
    buf = _read(fh, block_size)
    bom = len(_UTF8_BOM) if buf.startswith(_UTF8_BOM) else 0
    while not buf[bom:].strip(_WHITESPACE):  # blank so far: read on (blank lines are kept for the line count)
        more = _read(fh, block_size)
        if not more:
            raise FastaFormatError(path, "empty file: no FASTA record. Check the path (the download may have failed).")
        buf += more
    _check_head(path, buf[bom:], line0)
    lead = bom + len(buf[bom:]) - len(buf[bom:].lstrip(_WHITESPACE))
    line0 += buf[:lead].count(b"\n")
    return buf[lead:], lead, line0


def _iter_batches(fh, path, start, end, line0, block_size, table=None) -> Iterator[Batch]:
    if start > 0:
        found = _seek_record_start(fh, path, start, block_size, line0)
        if found is None:  # no record starts in the rest of the file
            return
        buf, pos = found  # pos: stream offset of buf[0]
    else:
        buf, pos, line0 = _start_of_file(fh, path, block_size, line0)
    line = line0
    eof = False
    consumed_since = 0
    while True:
        if end is not None and pos >= end:
            return
        if not eof:
            more = _read(fh, block_size)
            if more:
                buf += more
                consumed_since += len(more)
                _check_nul(path, buf, len(more), line)
            else:
                eof = True
        if eof:
            cut = len(buf)
        else:
            last = buf.rfind(b"\n>")
            if last < 0:  # no complete record yet (one record longer than a block): read more
                continue
            cut = last + 1
        if cut == 0:
            return
        block, buf = buf[:cut], buf[cut:]
        batch, line, pos, stop = _split_block(block, pos, line, end, table)
        batch.bytes_read = consumed_since
        consumed_since = 0
        if len(batch) or stop or eof:
            batch.end_offset, batch.end_line = pos, line
            yield batch
        if stop or eof:
            return


_RECORD_SEP = re.compile(rb"\n>([^\n]*)")  # a record start, capturing its header line


def _split_block(block: bytes, pos: int, line: int, end: int | None, table: bytes | None = None):
    """Split a block of complete records (starting with '>') into a Batch.

    Returns the batch, the line and offset of the first record after it, and whether ``end``
    was reached. All per-record work is C-level: one ``re.split`` cuts the block into headers and
    bodies in a single pass (``bytes.split`` then ``partition`` copied every record twice), and a
    list comprehension of ``bytes.translate`` makes the sequences. When ``end`` falls inside the
    block, the records after it are cut off first, not parsed and dropped.
    """
    stop = False
    if end is not None and pos + len(block) > end:  # the range ends in this block: cut it first
        if end <= pos:
            return Batch(block_offset=pos), line, pos, True
        j = block.find(b"\n>", end - pos - 1)  # the first record that starts at or after `end`
        if j >= 0:
            block, stop = block[: j + 1], True
    # [record 0 text, header 1, body 1, header 2, body 2, ...]; a body keeps its leading '\n'
    parts = _RECORD_SEP.split(block)
    first = parts[0]
    nl = first.find(b"\n")
    headers = [first[1:nl] if nl >= 0 else first[1:], *parts[1::2]]
    bodies = [first[nl:] if nl >= 0 else b"", *parts[2::2]]
    sequences = [b.translate(table, _WHITESPACE) for b in bodies]
    n = len(bodies)
    header_len = np.fromiter(map(len, headers), np.int64, n)
    body_len = np.fromiter(map(len, bodies), np.int64, n)
    if b"\r" in block:
        headers = [h.rstrip(b"\r") for h in headers]
    # each record takes '>' + header + body + the separator's '\n' (the last one has no separator)
    sizes = header_len + body_len + 2
    sizes[-1] -= 1
    # lines per record: the newlines of its body + the separator's. When the bodies hold no other
    # whitespace than '\n' (the bytes removed from all bodies add up to their newlines), a body's
    # newline count is the number of bytes removed from it: no per-record count() call
    removed = body_len - np.fromiter(map(len, sequences), np.int64, n)
    if int(removed.sum()) == int(np.count_nonzero(np.frombuffer(block, np.uint8) == 10)) - (n - 1):
        nls = removed + 1
    else:
        nls = np.fromiter((b.count(b"\n") for b in bodies), np.int64, n) + 1
    nls[-1] -= 1
    offsets = np.cumsum(np.concatenate([[pos], sizes])).tolist()
    lines = np.cumsum(np.concatenate([[line], nls])).tolist()
    batch = Batch(
        headers=headers, sequences=sequences, lines=lines[:n], offsets=offsets[:n], block=block, block_offset=pos
    )
    return batch, lines[n], offsets[n], stop


def read_fasta(path: str | os.PathLike, **kwargs) -> Iterator[FastaRecord]:
    """Yield the records of a plain or gzipped FASTA file one by one (see :func:`iter_batches`)."""
    for b in iter_batches(path, **kwargs):
        for h, s, ln, off in zip(b.headers, b.sequences, b.lines, b.offsets):
            yield FastaRecord(h, s, ln, off)


def count_newlines(path: str | os.PathLike, end: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Number of ``\\n`` in the first ``end`` bytes of the (decompressed) file."""
    total = 0
    with open_binary(path) as fh:
        left = end
        while left > 0:
            b = fh.read(min(block_size, left))
            if not b:
                break
            total += b.count(b"\n")
            left -= len(b)
    return total


def find_record_start(path: str | os.PathLike, offset: int, block_size: int = 1 << 16) -> int:
    """Offset of the first record start (``>`` at a line start) at or after ``offset``, or the file size."""
    size = os.path.getsize(path)
    if offset <= 0:
        return 0
    with open(path, "rb") as fh:
        fh.seek(offset - 1)
        pos = offset - 1
        carry = b""
        while True:
            b = fh.read(block_size)
            if not b:
                return size
            buf = carry + b
            i = buf.find(b"\n>")
            if i >= 0:
                return pos - len(carry) + i + 1
            carry = buf[-1:]
            pos += len(b)


__all__ = [
    "BINARY_CONTROL_SHARE",
    "GZIP_MAGIC",
    "Batch",
    "FastaFormatError",
    "FastaRecord",
    "count_newlines",
    "decode_header",
    "decode_ids",
    "find_record_start",
    "is_gzip",
    "iter_batches",
    "open_binary",
    "read_fasta",
]
