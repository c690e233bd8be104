"""The sequences of one Pfam family for the family-contacts recipe: extraction from the pfam40 FASTA
(header ``>NAME/start-end PFxxxxx``), the family's kortemme40 structure, and the hold-out of every
domain nearly identical to that structure's chain (global BLOSUM62 alignments, gap open -10, extend -0.5).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protein_performer.analysis.alignment import GAP_RESIDUE, aligned_row, identity
from protein_performer.errors import UserError
from protein_performer.outputs import atomic_output

KMER = 3


def family_chain(structures: str | Path, family: str) -> Path:
    """The structure file of ``family`` in a kortemme40-style folder (``<family>_<pdb>_<chain>.pdb``)."""
    structures = Path(structures)
    hits = sorted(structures.glob(f"{family}_*.pdb"))
    if not structures.is_dir():
        raise UserError(f"structures folder not found: {structures}; give structures=<kortemme40 dir>")
    if len(hits) != 1:
        raise UserError(
            f"{structures}: expected one file {family}_<pdb>_<chain>.pdb, found {len(hits)}; check family=PFxxxxx"
        )
    return hits[0]


def read_family(fasta: str | Path, family: str) -> list[tuple[str, str]]:
    """``(header, sequence)`` of every record whose header's second word is ``family``."""
    fasta = Path(fasta)
    if not fasta.exists():
        raise UserError(f"pfam40 FASTA not found: {fasta}; give input=<pfam40_domains.fasta.gz>")
    out: list[tuple[str, str]] = []
    header, parts, keep = None, [], False
    opener = gzip.open if fasta.name.endswith(".gz") else open
    with opener(fasta, "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                if keep and header is not None:
                    out.append((header, "".join(parts)))
                header, parts = line[1:].strip(), []
                words = header.split()
                keep = len(words) > 1 and words[1] == family
            elif keep:
                parts.append(line.strip())
    if keep and header is not None:
        out.append((header, "".join(parts)))
    return out


def read_family_fasta(fasta: str | Path) -> list[str]:
    """Sequences of a FASTA written by :func:`extract_family` (one line each)."""
    return [line.strip() for line in Path(fasta).read_text().splitlines() if line and not line.startswith(">")]


def _kmers(sequence: str, k: int = KMER) -> set[str]:
    return {sequence[i : i + k] for i in range(len(sequence) - k + 1)}


def holdout_similar(
    records: Sequence[tuple[str, str]], target: str, max_identity: float = 0.9, prefilter: float = 0.3
) -> tuple[list[tuple[str, str]], list[dict]]:
    """Split ``records`` into those kept and those at least ``max_identity`` identical to ``target``.

    Why: the test chain's own sequence (and near copies) is usually among the family's domains; a
    model that has seen it could recall that sequence rather than the family's structure. Only
    records sharing at least ``prefilter`` of their 3-mers with ``target`` are aligned (a pair at
    90% identity keeps about 0.9^3 = 73% of its 3-mers intact, so 0.3 misses none of them)."""
    target_kmers = _kmers(target)
    kept, removed = [], []
    for header, sequence in records:
        kmers = _kmers(sequence)
        if kmers and len(kmers & target_kmers) / len(kmers) >= prefilter:
            ident = identity(sequence, target)
            if ident >= max_identity:
                removed.append({"id": header.split()[0], "identity": round(ident, 3)})
                continue
        kept.append((header, sequence))
    return kept, removed


def extract_family(
    fasta: str | Path,
    family: str,
    output: str | Path,
    target: str | None = None,
    max_identity: float = 0.9,
    max_sequences: int | None = None,
    seed: int = 0,
    align: bool = False,
) -> dict:
    """Write the family's domains (minus the held-out ones) to ``output``; return the counts.
    ``align``: write each domain as its row of the alignment to ``target`` (:func:`aligned_row`),
    so that every record has ``target``'s length and position i is the chain's residue i."""
    records = read_family(fasta, family)
    if not records:
        raise UserError(f"{fasta}: no record of family {family} (headers '>NAME/start-end PFxxxxx')")
    n_all = len(records)
    removed: list[dict] = []
    if target is not None and max_identity < 1.0:
        records, removed = holdout_similar(records, target, max_identity)
    if max_sequences is not None and len(records) > max_sequences:
        idx = np.sort(np.random.default_rng(seed).choice(len(records), max_sequences, replace=False))
        records = [records[i] for i in idx]
    if align:
        if target is None:
            raise UserError("extract_family: align=True needs the target chain's sequence")
        records = [(header, aligned_row(sequence, target)) for header, sequence in records]
    with atomic_output(output) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for header, sequence in records:
            fh.write(f">{header}\n{sequence}\n")
    coverage = {}
    if align and records:
        coverage = {
            "aligned_to": len(target),
            "covered": round(1 - sum(r.count(GAP_RESIDUE) for _, r in records) / (len(records) * len(target)), 3),
        }
    return {
        **coverage,
        "family": family,
        "n_family": n_all,
        "n_held_out": len(removed),
        "held_out": removed,
        "n_written": len(records),
        "max_identity": max_identity,
    }
