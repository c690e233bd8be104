"""User-facing errors and the one way every command reports them.

A :class:`UserError` is a problem with what the user gave (a file, a path, a setting) that the
user can fix. Its message is one line: it names the file (and the record or line where there is
one) and says what to do. The command-line entry points wrap their work in :func:`cli_errors`,
which prints ``error: <message>`` on stderr and exits with :data:`EXIT_USER_ERROR`, without a
traceback; any other exception is a bug and keeps its traceback.

Domain errors (``FastaFormatError``, ``IngestError``, ``ShardFormatError``, ``StructureError``,
``MapsFormatError`` in analysis.maps, ...) subclass :class:`UserError`, so library callers can catch them one by
one or all at once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 1  # as the ingest CLI has always exited on bad input
F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input or a bad setting; the message names the file and what to do."""


class IncompleteOutputError(UserError):
    """A file that a command did not finish writing (the job was killed); rerun or resume it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (h5py's run over many lines), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def cli_errors(fn: F) -> F:
    """Run ``fn``; a :class:`UserError` (or a full disk / permission problem) becomes one line
    ``error: ...`` on stderr and exit code 1. ``PROTEIN_PERFORMER_TRACEBACK=1`` re-raises instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e))
        except OSError as e:
            msg = os_error_message(e)
            if msg is None:
                raise
            _fail(msg)

    return wrapper  # type: ignore[return-value]


def os_error_message(e: OSError) -> str | None:
    """A one-line, actionable message for the OS errors a user causes (full disk, no permission,
    a directory where a file is expected and the reverse), or None for any other OSError."""
    import errno

    where = e.filename if getattr(e, "filename", None) else "output"
    if e.errno == errno.ENOSPC or e.errno == errno.EFBIG or e.errno == errno.EDQUOT:
        return (
            f"{where}: no space left on the device (or file size limit reached): free space and rerun "
            "(ingest, export_attention, embed, predict_contacts: resume=true; train: ckpt_path=last)"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: permission denied (read-only directory or file?): choose a writable path"
    if e.errno == errno.EISDIR:
        return f"{where}: is a directory, but a file is expected here"
    if e.errno == errno.ENOTDIR:
        return f"{where}: is a file (or under one), but a directory is expected here"
    if e.errno == errno.ENOENT:
        return f"{where}: no such file or directory"
    return None


def _fail(message: str) -> None:
    if os.environ.get("PROTEIN_PERFORMER_TRACEBACK") == "1":
        raise
    message = " ".join(str(message).split("\n"))  # one line
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
