"""Pairwise alignment onto a reference sequence: the coordinate frame of a model trained on rows
aligned to one chain (the family-contacts recipe's ``align=true``; ``predict_contacts`` with
``align_to``). Global alignments, BLOSUM62, gap open -10, extend -0.5 (Biopython's PairwiseAligner).
"""

from __future__ import annotations

import numpy as np

GAP_OPEN = -10.0
GAP_EXTEND = -0.5
GAP_RESIDUE = "X"  # an aligned row's column that the sequence does not cover (a deletion against the reference)


def global_alignment(a: str, b: str):
    """The best global alignment of ``a`` and ``b`` (BLOSUM62, gap open -10, extend -0.5)."""
    from Bio.Align import PairwiseAligner, substitution_matrices

    aligner = PairwiseAligner(mode="global", open_gap_score=GAP_OPEN, extend_gap_score=GAP_EXTEND)
    matrix = substitution_matrices.load("BLOSUM62")
    aligner.substitution_matrix = matrix
    known = set(matrix.alphabet)  # 20 amino acids, B, Z, X, *: others (U, O) align as X
    a, b = ("".join(c if c in known else "X" for c in s.upper()) for s in (a, b))
    return aligner.align(a, b)[0]


def identity(a: str, b: str) -> float:
    """Identical aligned positions / length of the shorter sequence (global alignment, BLOSUM62,
    gap open -10, extend -0.5)."""
    aln = global_alignment(a, b)
    same = sum(1 for (s1, e1), (s2, e2) in zip(*aln.aligned) for x, y in zip(a[s1:e1], b[s2:e2]) if x == y)
    return same / max(min(len(a), len(b)), 1)


def aligned_positions(seq: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Matched position pairs ``(i in seq, k in target)`` of a global BLOSUM62 alignment."""
    if seq == target:
        idx = np.arange(len(seq), dtype=np.int64)
        return idx, idx.copy()
    aln = global_alignment(seq, target)
    src, dst = [], []
    for (s1, e1), (s2, e2) in zip(*aln.aligned):
        src.extend(range(s1, e1))
        dst.extend(range(s2, e2))
    return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def aligned_row(seq: str, target: str) -> str:
    """``seq`` on ``target``'s columns (a query-anchored alignment row, like HHblits' a3m without
    insertions): the residue aligned to each position of ``target``, ``GAP_RESIDUE`` where none is;
    residues ``seq`` has between target positions are dropped. Always ``len(target)`` long."""
    src, dst = aligned_positions(seq, target)
    row = np.full(len(target), GAP_RESIDUE, dtype="<U1")
    row[dst] = np.asarray(list(seq), dtype="<U1")[src]
    return "".join(row)
