"""outputs: files and folders written so that a crash never leaves one that looks complete.

Files. :func:`atomic_output` hands out a temporary path next to the target, hidden
``.<name>.<pid>.partial`` (:func:`temporary_name`: the one temporary-name scheme of the package);
the caller writes the whole file there, and only when the block ends without an error is the file
flushed to disk (``fsync``) and renamed onto the target (``os.replace``: atomic on POSIX). A process
killed at any instant (SIGKILL, OOM, a time limit) leaves the previous target (or none) and at most
a hidden temporary, never a truncated target; :func:`remove_temporaries` removes such leftovers.
:func:`write_text`, :func:`write_bytes`, :func:`write_json` and :func:`save_figure` are the common
cases. ``durable=False`` skips the fsyncs (the rename stays atomic: a killed process still leaves
the old file or the new one; only a power cut may lose the new one) where a file is rewritten very
often or is cheap to redo (an ingest's per-block progress, its shards). Not to be confused with
the resumable ``<output>.partial`` (not hidden) that export, embed and predict_contacts keep
between runs and :func:`publish` onto the output when it is complete.

Folders (issue 18). A command that writes a folder of results (``contacts``, ``aa_similarity``, an
ingest with ``overwrite=true``, the family-contacts recipe) writes the new results into a hidden
staging folder beside the target, ``.<name>.staging-<pid>``, and only when all of them are written
does :func:`replace_directory` put the staging folder in the target's place:

- on Linux with one ``renameat2(RENAME_EXCHANGE)`` call (the old and the new folder swap names
  atomically: at every instant the target is either the old complete output or the new one);
- elsewhere (or on a file system without the call) with two renames, the old folder first moved
  to ``.<name>.replaced-<pid>``; a kill between them leaves no target, and the next run (any
  command that stages into the same target) renames the old folder back before it starts.

Entries of the old folder that the command does not own (``ours(name)`` is False: a user's notes,
a SLURM log folder, another command's outputs when two share a folder) are moved into the new one
after the swap; a kill in that instant leaves them in the hidden ``.replaced`` / ``.staging``
folder, and the next run moves them back (:func:`recover`) instead of deleting them.

Library code, any layer: this module imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"\..+\.[0-9]+\.partial")  # what temporary_name gives
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_STAGING = "staging"
_REPLACED = "replaced"


def temporary_name(path: str | Path) -> Path:
    """The temporary a file ``path`` is written under: hidden, in the same directory (same file
    system, so the final rename is atomic), marked with this process's id and ``.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the file system allows it."""
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened / synced
        fsync_file(path)


def publish(tmp: str | Path, path: str | Path, durable: bool = True) -> None:
    """Rename the complete file ``tmp`` onto ``path`` (atomic); ``durable``: flush ``tmp`` to disk
    first and sync the directory entry after."""
    if durable:
        fsync_file(tmp)
    os.replace(tmp, path)
    if durable:
        sync_directory(Path(path).parent)


@contextlib.contextmanager
def atomic_output(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """``with atomic_output("out/report.json") as tmp: write(tmp)``: ``path`` appears (or is
    replaced) only when the block ends without an error (:func:`publish`); on an error the
    temporary is removed. The parent directory is created. Writers that pick a format from the file
    name (matplotlib) should be given the format explicitly: the temporary ends in ``.partial``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        publish(tmp, path, durable)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj, durable: bool = True, **json_kwargs) -> Path:
    """``json.dumps(obj, **json_kwargs)`` written to ``path`` atomically (no newline added)."""
    return write_text(path, json.dumps(obj, **json_kwargs), durable)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """``fig.savefig`` atomically; the format is the target's suffix (``png`` by default)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    return path


def remove_temporaries(folder: str | Path, name: str = "*", legacy: Iterable[str] = ()) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``: those of the targets whose
    name matches the glob ``name`` (:func:`temporary_name`), and the files matching the ``legacy``
    globs (the temporary names of earlier versions). For a caller that knows that no other process
    is writing into ``folder``: a running writer's temporary would be removed too. Returns the
    paths removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f".{name}.*.partial") if _TEMPORARY.fullmatch(p.name)]
    found += [p for pattern in legacy for p in folder.glob(pattern)]
    removed = []
    for path in dict.fromkeys(found):
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the names of two existing paths atomically; False where the system cannot (then
    nothing was changed)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95, 1):  # EINVAL, ENOSYS, EOPNOTSUPP, EPERM: not supported here
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _hidden(target: Path, kind: str, pid: int | None = None) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid() if pid is None else pid}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine; this process's own id: True)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path) -> Iterator[tuple[str, Path]]:
    """(kind, path) of the hidden folders dead runs left beside ``target``."""
    for path in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = path.name[len(target.name) + 2 :].rpartition("-")
        if kind in (_STAGING, _REPLACED) and pid.isdigit() and path.is_dir() and not pid_alive(int(pid)):
            yield kind, path


def _move_foreign(source: Path, target: Path, ours: Callable[[str], bool]) -> None:
    """Move the entries of ``source`` that the command does not own into ``target`` (never over
    an entry of the same name)."""
    for entry in sorted(source.iterdir()):
        if not ours(entry.name) and not (target / entry.name).exists():
            os.replace(entry, target / entry.name)


def recover(target: str | Path, ours: Callable[[str], bool] = lambda name: True) -> None:
    """Undo what a run killed while replacing ``target`` left: an old folder moved aside with no
    target in its place is renamed back; entries the command does not own are moved back into the
    target; then the dead runs' hidden folders are removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    left = list(_leftovers(target))
    for kind, path in left:
        if kind == _REPLACED and not target.exists():
            log.warning("%s: the previous output was moved aside by a killed run; putting it back", target)
            os.replace(path, target)
    for _, path in left:
        if path.exists():
            if target.is_dir():
                _move_foreign(path, target, ours)
            log.info("removing %s (left by a killed run)", path)
            shutil.rmtree(path, ignore_errors=True)


def replace_directory(stage: str | Path, target: str | Path, ours: Callable[[str], bool] = lambda name: True) -> None:
    """Put the complete folder ``stage`` in ``target``'s place (see the module docstring); the old
    folder's entries that ``ours`` rejects are kept in the new one."""
    stage, target = Path(stage), Path(target)
    if not target.exists():
        os.replace(stage, target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target}: is a file, not an output folder")
    if exchange(stage, target):
        old = stage
    else:
        old = _hidden(target, _REPLACED)
        os.replace(target, old)
        os.replace(stage, target)
    _move_foreign(old, target, ours)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: str | Path, ours: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """``with staged_directory(out) as stage: write everything into stage``: when the block ends
    without an error, ``stage`` replaces ``out`` (:func:`replace_directory`); on an error the stage
    is removed and ``out`` is as it was. A killed run leaves ``out`` untouched and a hidden stage
    that the next run removes."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: is a file, not an output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target, ours)
    stage = _hidden(target, _STAGING)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        replace_directory(stage, target, ours)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
