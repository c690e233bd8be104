"""Checkpoints that a killed job cannot tear, and clear errors for checkpoints that do not fit.

Writing. :class:`AtomicCheckpointIO` serialises the checkpoint into a temporary file in the
checkpoint's own folder (``.<name>.<pid>.partial``, :func:`protein_performer.outputs.atomic_output`),
fsyncs it, renames it over the target with ``os.replace`` (atomic on POSIX within one file system)
and fsyncs the folder. A job killed at any instant leaves either the previous complete file or the
new complete file, never a truncated one; at worst a stray temporary that the next run removes
(:func:`remove_stale_temporaries`).
(Lightning's own ``TorchCheckpointIO`` goes through an fsspec transaction whose temporary file is
made by ``tempfile.mkstemp()`` in the system temp folder; when that is another file system the
"rename" is a copy into the target, which a kill can tear.) Under DDP and FSDP (full state dict)
only global rank 0 writes, as with Lightning's default.

Reading. :func:`check_checkpoint` opens a checkpoint before training resumes from it and turns
what would be a long traceback into one line naming the file: a truncated or corrupted file
(:class:`~protein_performer.errors.IncompleteOutputError`), a file that is not a training
checkpoint, or a checkpoint of another model shape (every mismatching tensor's shapes and the
model settings that differ) (:class:`CheckpointError`).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from protein_performer.errors import IncompleteOutputError, UserError
from protein_performer.outputs import atomic_output, publish, remove_temporaries, sync_directory, temporary_name

log = logging.getLogger(__name__)

LEGACY_TEMPORARIES = (".*.ckpt.*.tmp",)  # the temporary names of earlier versions (mkstemp's, the link's)


class CheckpointError(UserError):
    """A checkpoint that cannot be used with this configuration (another model, not a checkpoint)."""


class _WriteErrors:
    """A binary file whose first failed ``write`` is kept: ``torch.save`` reports a full disk as an
    opaque ``RuntimeError`` of its zip writer, and the ``OSError`` behind it is what to show."""

    def __init__(self, fh):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder, fsync and rename.

    On failure (a full disk, a file size limit) the temporary file is removed, ``path`` is left as
    it was, and the ``OSError`` raised names ``path``.
    """
    path = Path(path)
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            out = _WriteErrors(fh)
            try:
                torch.save(obj, out)
            except RuntimeError as e:
                if out.error is None:
                    raise
                raise out.error from e
    except OSError as e:
        if e.filename is None:  # a failed write names no file: name the checkpoint
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


def atomic_link(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` (a relative symlink, or a copy where symlinks are not allowed),
    replacing any previous ``link`` atomically: ``link`` always exists and is always complete."""
    target, link = Path(target), Path(link)
    tmp = temporary_name(link)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
    except OSError:  # no symlinks here (Windows without the privilege, some file systems): copy
        with open(target, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        publish(tmp, link)
        return
    os.replace(tmp, link)
    sync_directory(link.parent)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed job left in ``folder`` (``.<name>.ckpt.<pid>.partial``,
    and ``.<name>.ckpt.*.tmp`` of earlier versions)."""
    removed = remove_temporaries(folder, "*.ckpt", legacy=LEGACY_TEMPORARIES)
    if removed:
        log.info("removed %d temporary checkpoint file(s) left by an interrupted run in %s", len(removed), folder)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except _LOAD_ERRORS as e:
            raise _unreadable(path, e) from e


# what torch.load raises on a truncated, empty or overwritten file
_LOAD_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError)


def _unreadable(path, e: BaseException) -> IncompleteOutputError:
    reason = " ".join(str(e).split())[:160] or type(e).__name__
    folder = Path(path).parent
    return IncompleteOutputError(
        f"{path}: not a complete checkpoint (truncated or corrupted: {reason}); the job that wrote it was "
        f"probably killed while saving (before this version checkpoints were written in place): resume from "
        f"another checkpoint in {folder} (ckpt_path=<file>), or start a new run"
    )


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` of a training checkpoint on the CPU (memory-mapped: tensors are read lazily),
    with one-line errors for a file that is truncated, corrupted, or not a training checkpoint."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except _LOAD_ERRORS as e:
        raise _unreadable(path, e) from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path}: not a training checkpoint (no state_dict; a file written by the trainer is expected, "
            f"e.g. <run_dir>/checkpoints/last.ckpt)"
        )
    return ckpt  # type: ignore[return-value]


def _shape(t: Any) -> str:
    return "x".join(str(s) for s in getattr(t, "shape", ())) or "scalar"


def check_checkpoint(path: str | os.PathLike, module: torch.nn.Module, max_listed: int = 3) -> None:
    """Raise a one-line error unless ``path`` is a complete checkpoint whose weights fit ``module``.

    Compares every tensor of the checkpoint's ``state_dict`` with ``module.state_dict()`` (names
    and shapes), and names the model settings (``hyper_parameters.model``) that differ.
    """
    path = Path(path)
    if path.is_dir():  # a sharded (distributed) checkpoint: Lightning's strategy reads and checks it
        return
    ckpt = load_checkpoint_file(path)
    saved, expected = ckpt["state_dict"], module.state_dict()
    problems = []
    for name, t in expected.items():
        if name not in saved:
            problems.append(f"{name} missing")
        elif tuple(saved[name].shape) != tuple(t.shape):
            problems.append(f"{name} is {_shape(saved[name])} in the checkpoint but {_shape(t)} in this model")
    problems += [f"{name} not in this model" for name in saved if name not in expected]
    if not problems:
        return
    listed = "; ".join(problems[:max_listed])
    if len(problems) > max_listed:
        listed += f"; and {len(problems) - max_listed} more"
    settings = ""
    old = (ckpt.get("hyper_parameters") or {}).get("model")
    new = getattr(getattr(module, "hparams", {}), "get", lambda k: None)("model")
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        diff = [
            f"{k}={old.get(k)!r} (now {new.get(k)!r})"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k != "favor_kwargs"
        ]
        if diff:
            settings = f"; it was trained with model.{', model.'.join(diff)}"
    raise CheckpointError(
        f"{path}: checkpoint of another model shape ({listed}){settings}: resume with the model settings it "
        f"was trained with, or start a new run (another run folder, or ckpt_path=null)"
    )
