"""What the sequence-level commands (``predict_contacts``, ``embed``) share: the device choice,
the checks on input and output paths before any work, and the ``<output>.partial`` a run writes
and renames when complete (``resume=true`` continues it, ``overwrite=true`` discards it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from protein_performer.analysis.export import SequenceRecord
from protein_performer.errors import UserError
from protein_performer.outputs_h5 import ResumableH5


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_run_paths(input: str | Path, output: str | Path, command: str, resume: bool, overwrite: bool) -> ResumableH5:
    """The run's :class:`ResumableH5` after the checks every run makes first: the input exists,
    the output is not a directory, and an interrupted run's partial file is only touched when asked to."""
    out = Path(output)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; output= is the .h5 file {command} writes")
    if not Path(input).exists():
        raise UserError(f"{input}: input not found (a FASTA file or a folder of structures)")
    return ResumableH5(out, f"{command} run", resume, overwrite)


def as_records(sequences: Iterable[str | tuple | SequenceRecord]) -> Iterator[SequenceRecord]:
    """Sequences given as strings (ids ``seq0``, ``seq1``, ...), ``(id, sequence)`` pairs or records."""
    for n, s in enumerate(sequences):
        if isinstance(s, SequenceRecord):
            yield s
        elif isinstance(s, str):
            yield SequenceRecord(f"seq{n}", s)
        else:
            rid, seq = s
            yield SequenceRecord(str(rid), str(seq))
