"""Export, the input side: the sequences to export (a FASTA file or the chains of structure
files), what identifies the input for ``resume``, the crop of a sequence longer than the model's
``max_len``, and the ``include`` / ``crop`` settings.

Crop (``max_residues`` = ``max_len`` minus the special tokens): ``error`` (a clear error naming
the record), ``skip`` (counted and reported), ``start`` (residues ``[0, max_residues)``) or
``center`` (``start = (L - max_residues) // 2``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protein_performer.analysis.export.model import ExportError
from protein_performer.data.tokenizer import Tokenizer, UnknownResidueError
from protein_performer.errors import MissingFileError

log = logging.getLogger(__name__)

INCLUDE = ("attentions", "apc", "mean", "per_token", "apc_mean", "contacts")
CROPS = ("error", "skip", "start", "center")
INVALID = ("error", "skip")  # a bad FASTA record: raise, or count it and go on


@dataclass(frozen=True)
class SequenceRecord:
    """One sequence to export; ``source`` is ``<structure file>:<chain>`` or the FASTA file name."""

    id: str
    sequence: str
    source: str = ""


@dataclass
class InputReport:
    """What reading the input left out (counted, with reasons)."""

    failures: list[dict] = field(default_factory=list)

    def add(self, source: str, reason: str) -> None:
        log.warning("%s", reason)
        self.failures.append({"source": source, "reason": reason})


def is_structure_input(path: str | Path) -> bool:
    from protein_performer.analysis.structures import STRUCTURE_SUFFIXES

    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(STRUCTURE_SUFFIXES)


def read_sequences(
    input: str | Path, min_residues: int = 30, invalid: str = "error", report: InputReport | None = None
) -> Iterator[SequenceRecord]:
    """The sequences of a FASTA file (plain or gzip) or of the protein chains of a structure folder
    (or one PDB / mmCIF file; chains as :func:`analysis.structures.load_structures` chooses them:
    every protein chain of at least ``min_residues`` residues, ``id`` = ``<stem>_<chain>``,
    ``source`` = ``<file name>:<chain>``, the keys the contacts step matches on).

    FASTA records: ``id`` = the header's first word. An empty record or one with a character
    outside the alphabet raises ``ValueError`` naming the file, line and id
    (``invalid="error"``), or is counted in ``report`` and skipped (``invalid="skip"``).
    """
    if invalid not in INVALID:
        raise ExportError(f"invalid must be 'error' or 'skip', got {invalid!r}")
    report = report if report is not None else InputReport()
    path = Path(input)
    if not path.exists():
        raise MissingFileError(f"input not found: {path}")
    if is_structure_input(path):
        yield from _structure_sequences(path, min_residues, report)
    else:
        yield from _fasta_sequences(path, invalid, report)


def _structure_sequences(path: Path, min_residues: int, report: InputReport) -> Iterator[SequenceRecord]:
    """The protein chains of a structure folder or file, as :func:`load_structures` reads them."""
    from protein_performer.analysis.structures import load_structures, structure_files

    if path.is_dir() and not structure_files(path):
        raise ExportError(
            f"{path}: no structure files (.pdb, .cif, .ent, .gz) in this folder; give a folder of "
            "PDB / mmCIF files or a FASTA file"
        )
    chains, failures = load_structures(path, min_residues=min_residues)
    for f in failures:
        report.failures.append({"source": f"{f.source}:{f.chain}" if f.chain else f.source, "reason": f.reason})
    if not chains:
        why = (
            f" ({failures[0].reason}{f'; {len(failures) - 1} more failures' if len(failures) > 1 else ''})"
            if failures
            else ""
        )
        raise ExportError(f"{path}: no protein chain with >= {min_residues} standard residues found{why}")
    for c in chains:
        yield SequenceRecord(c.name, c.sequence, c.key)


def _fasta_sequences(path: Path, invalid: str, report: InputReport) -> Iterator[SequenceRecord]:
    """The records of a FASTA file; a bad one raises (``invalid="error"``) or is counted and skipped."""
    from protein_performer.data.fasta import read_fasta

    tok = Tokenizer()
    for rec in read_fasta(path):
        header = rec.header_text.strip()
        record_id = header.split()[0] if header else f"line{rec.line}"
        problem = None
        if not rec.sequence.rstrip(b"*"):
            problem = "empty sequence"
        else:
            try:
                seq = tok.decode(tok.encode_bytes(rec.sequence))
            except UnknownResidueError as e:
                problem = str(e)
        if problem is not None:
            msg = f"{path}:{rec.line} record {record_id}: {problem}"
            if invalid == "error":
                raise ExportError(msg + " (set invalid=skip to leave such records out)")
            report.add(f"{path.name}:{rec.line}", msg)
            continue
        yield SequenceRecord(record_id, seq, path.name)


def input_key(input: str | Path) -> dict:
    """What identifies the input for ``resume``: the path and the size and modification time of
    the file (or of each structure file of a folder)."""
    path = Path(input)

    def sig(p: Path) -> list:
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]

    if path.is_dir():
        return {"path": str(input), "files": [sig(p) for p in sorted(path.iterdir()) if p.is_file()]}
    return {"path": str(input), "file": sig(path)}


def crop_window(length: int, max_residues: int, crop: str, record: str) -> tuple[int, int] | None:
    """``(start, stop)`` of the residues to keep, or None to skip the record (``crop="skip"``)."""
    if crop not in CROPS:
        raise ExportError(f"crop must be one of {CROPS}, got {crop!r}")
    if length <= max_residues:
        return 0, length
    if crop == "error":
        raise ExportError(
            f"{record}: {length} residues do not fit the model's max_len ({max_residues} residues "
            "besides the special tokens); set crop=start|center|skip"
        )
    if crop == "skip":
        return None
    start = 0 if crop == "start" else (length - max_residues) // 2
    return start, start + max_residues


def parse_include(include: Iterable[str]) -> tuple[str, ...]:
    """``include`` as a tuple, checked: a non-empty subset of :data:`INCLUDE`."""
    inc = tuple(str(x) for x in include)
    bad = [x for x in inc if x not in INCLUDE]
    if bad or not inc:
        raise ExportError(f"include must be a non-empty subset of {INCLUDE}, got {list(inc)}")
    if "apc" in inc and "attentions" not in inc:
        log.info("include has apc without attentions: only the APC maps are stored")
    return inc
