"""Write an output file so that a crash never leaves one that looks complete.

:func:`atomic_output` hands out a temporary path next to the target (a hidden
``.<name>.<pid>.partial``); the caller writes the whole file there, and only when the block ends
without an error is the file flushed to disk (``fsync``) and renamed onto the target
(``os.replace``: atomic on POSIX). A process killed at any instant (SIGKILL, OOM, a time limit)
leaves the previous target (or none) and at most a hidden temporary, never a truncated target.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def temporary_name(path: str | Path) -> Path:
    """The temporary a file ``path`` is written under: hidden, in the same directory (same file
    system, so the final rename is atomic), marked ``.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Flush ``tmp`` to disk and rename it onto ``path`` (atomic), then sync the directory entry."""
    fsync_file(tmp)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened / synced
        fsync_file(Path(path).parent)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """``with atomic_output("out/report.json") as tmp: write(tmp)``: ``path`` appears (or is
    replaced) only when the block ends without an error; on an error the temporary is removed.
    The parent directory is created. Writers that pick a format from the file name (matplotlib)
    should be given the format explicitly: the temporary ends in ``.partial``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """``fig.savefig`` atomically; the format is the target's suffix (``png`` by default)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    return path
