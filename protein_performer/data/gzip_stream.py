"""Opening input files: gzip detection by magic bytes, and a gzip/BGZF reader that inflates ahead
in a thread.

``zlib`` releases the GIL while it inflates, so :class:`ThreadedGzipReader` decompresses the next
pieces of the stream while the caller (the FASTA reader) parses the current one: the same bytes as
:func:`gzip.open`, about 1.3x less CPU in the caller's thread.
"""

from __future__ import annotations

import gzip
import os
import queue
import threading
import zlib
from pathlib import Path
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str | os.PathLike) -> bool:
    """True when the file starts with the gzip magic bytes (gzip and BGZF alike)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Open a plain or gzip/BGZF file for binary reading (compression detected by magic bytes)."""
    if is_gzip(path):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=0)


class ThreadedGzipReader:
    """Multi-member gzip/BGZF decompression with zlib in a read-ahead thread.

    ``zlib`` releases the GIL while it inflates, so the next blocks are decompressed while the
    caller parses the current one (the same bytes as :func:`gzip.open`, about 1.3x less CPU).
    ``read(n)`` returns at least ``n`` bytes unless the stream ends; ``seek`` only goes forward.
    A truncated or corrupt stream raises ``EOFError`` / ``zlib.error`` in the reading thread.
    """

    _RAW = 2 << 20  # compressed bytes per step: pieces of ~4-8 MiB (fewer, larger inflate calls were faster)

    def __init__(self, path: Path, depth: int = 4):
        self._fh = open(path, "rb")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending = memoryview(b"")  # the rest of the last piece, not yet read
        self._done = False
        self._pos = 0
        self._t = threading.Thread(target=self._produce, name=f"gunzip {path.name}", daemon=True)
        self._t.start()

    def _produce(self) -> None:
        try:
            d = zlib.decompressobj(31)
            data = b""
            while not self._stop.is_set():
                if not data:
                    data = self._fh.read(self._RAW)
                    if not data:
                        if d.eof:
                            break
                        raise EOFError("compressed file ended before the end-of-stream marker was reached")
                out = d.decompress(data)
                data = b""
                if d.eof:  # member finished; the rest (if any) is the next member
                    data = d.unused_data
                    if data.strip(b"\x00") == b"" and not self._fh.peek(1)[:1]:
                        data = b""  # trailing zero padding
                    if data or self._fh.peek(1)[:1]:
                        d = zlib.decompressobj(31)
                if out:
                    self._put(out)
            self._put(None)
        except BaseException as e:  # handed to the reader
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self) -> bytes:
        if self._done:
            return b""
        item = self._q.get()
        if item is None:
            self._done = True
            return b""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def read(self, n: int) -> bytes:
        """At least ``n`` bytes, at most ``2 n``; b"" at the end.

        Whole pieces are returned without a copy when they fit; a larger piece (small blocks) is
        handed out in parts through a memoryview, so that each byte is copied at most once.
        """
        parts: list[memoryview] = []
        have = 0
        while have < n:
            if not self._pending:
                b = self._get()
                if not b:
                    break
                self._pending = memoryview(b)
            p = self._pending
            k = len(p) if have + len(p) <= 2 * n else n - have
            parts.append(p[:k])
            self._pending = p[k:]
            have += k
        self._pos += have
        if len(parts) == 1 and len(parts[0]) == len(parts[0].obj):
            return parts[0].obj  # a whole piece, as decompressed
        return b"".join(parts)

    def seek(self, offset: int) -> None:
        if offset < self._pos:
            raise ValueError("ThreadedGzipReader only seeks forward")
        while self._pos < offset:
            if not self._pending:
                b = self._get()
                if not b:
                    break
                self._pending = memoryview(b)
            take = min(len(self._pending), offset - self._pos)
            self._pending = self._pending[take:]
            self._pos += take

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self._fh.close()
