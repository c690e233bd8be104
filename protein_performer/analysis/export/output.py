"""Export, the output file system: checks on the output path before any work, and the free
space (and ``ulimit -f``) checked before each record, so that a full disk stops the export
between records, with the partial file flushed and resumable, instead of failing inside HDF5
(whose file then cannot even be closed).

A record's size bound: ``1.01 * (n_maps * layers * heads * L^2 * 2 + embeddings + L) + 64 KiB``
(float16 maps uncompressed, deflate expands incompressible data by < 0.1 %; 64 KiB of metadata).
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Sequence
from pathlib import Path

from protein_performer.analysis.export.model import ExportError

HDF5_METADATA_BYTES = 64 << 10
DEFLATE_EXPANSION = 1.01
_NO_SPACE_TEXTS = (
    "No space left",
    "File too large",
    "Disk quota exceeded",
    f"errno = {errno.ENOSPC},",
    f"errno = {errno.EFBIG},",
)


class NoSpaceError(ExportError):
    """The next record would not fit: raised between records, the partial file stays resumable."""


def check_output(output: Path) -> None:
    """``output`` can be written: not a directory, under a writable directory."""
    if output.is_dir():
        raise ExportError(f"{output}: is a directory; output= names the maps.h5 file to write")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"{parent}: is a file, but output={output} needs it to be a directory")
            if not os.access(parent, os.W_OK):
                raise ExportError(f"{parent}: not writable (permission denied); choose a writable output path")
            break


def space_problem(e: BaseException) -> bool:
    """A write failed because the disk (or the file size limit) is full; h5py's errors carry the
    C library's errno only in their text."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(e)
    return any(m in text for m in _NO_SPACE_TEXTS)


def no_space_message(target: Path, output: Path, detail: str = "") -> str:
    return (
        f"{target}: no space left on the device (or the file size limit reached) while writing {output}"
        f"{f' ({detail})' if detail else ''}; free space and rerun with resume=true"
    )


def record_bytes(n_maps: int, depth: int, heads: int, length: int, dim: int, inc: Sequence[str]) -> int:
    """An upper bound of the bytes a record adds to the file (see the module docstring)."""
    maps = n_maps * depth * heads * length * length * 2
    emb = (4 * dim if "mean" in inc else 0) + (4 * length * dim if "per_token" in inc else 0)
    return int(DEFLATE_EXPANSION * (maps + emb + length)) + HDF5_METADATA_BYTES


def room_for(path: Path, needed: int) -> tuple[bool, str]:
    """Whether ``needed`` more bytes fit on ``path``'s file system and under the file size limit
    (``ulimit -f``); when not, why."""
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        return False, f"{free / 2**20:.1f} MiB free, the next record needs up to {needed / 2**20:.1f} MiB"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and path.stat().st_size + needed > limit:
        return False, f"file size limit {limit / 2**20:.1f} MiB"
    return True, ""


def ensure_room(target: Path, output: Path, needed: int) -> None:
    """:class:`NoSpaceError` unless ``needed`` more bytes fit in ``target``."""
    ok, detail = room_for(target, needed)
    if not ok:
        raise NoSpaceError(no_space_message(target, output, detail))
