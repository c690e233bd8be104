"""Multiple sequence alignments for the family-contacts recipe (issue 21): A3M, Stockholm and aligned
FASTA read into one :class:`Alignment`; gap filtering; DCA sequence reweighting.

An :class:`Alignment` holds ``tokens``: (N, L) uint8, each residue as its id in the project's
tokenizer (4-28, ``data/tokenizer.py``; letters are case-insensitive) and each gap as :data:`GAP`
(29, the tokenizer's vocabulary size: outside it, so a gap cannot reach a model as a token by
accident; the recipe chooses what a gap becomes). ``columns`` maps every column to the query
residue it sits on (0-based in the query's full sequence, -1 where the query has a gap).

The formats (``format`` from the file name: ``.a3m``, ``.sto`` / ``.stk`` / ``.stockholm``, else
aligned FASTA; ``.gz`` allowed):

- A3M (HHblits, ColabFold): uppercase letters and ``-`` are match columns; lowercase letters and
  ``.`` are insertions relative to the query and are dropped. Every row then has the query's length.
- Stockholm (Pfam, HMMER), read with Biopython's ``Bio.AlignIO``: with a ``#=GC RF`` line, its
  ``.`` / ``-`` columns are insert columns; without one, every column holding a lowercase letter is
  (the Pfam / HMMER convention). Insert columns are dropped.
- Aligned FASTA (MAFFT, Clustal): every column is kept; lowercase letters are residues (MAFFT
  writes them); ``-`` and ``.`` are gaps.

The query is the first record unless ``query=<record id>`` says otherwise. Any bad input (no
record, unknown letters, rows of different lengths, a query not found, nothing left after
filtering) raises :class:`AlignmentError`, a :class:`~protein_performer.errors.UserError` naming
the file and the record (and its line where the reader knows it).
"""

from __future__ import annotations

import gzip
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from protein_performer.data.tokenizer import RESIDUES, Tokenizer
from protein_performer.errors import UserError

log = logging.getLogger(__name__)

GAP = Tokenizer().vocab_size  # 29: the gap symbol, one past the tokenizer's ids
IDENTITY_THRESHOLD = 0.8  # neighbours at >= 80% identity share a sequence's weight (DCA convention)
MAX_ROW_GAP = 0.5  # a row gapped in more than half of the query's columns is dropped
MAX_COL_GAP = 0.5  # a column gapped in more than half of the rows is dropped (GREMLIN's cut)
_INVALID = 255
SUFFIXES = {".a3m": "a3m", ".sto": "stockholm", ".stk": "stockholm", ".stockholm": "stockholm"}


class AlignmentError(UserError):
    """An alignment file that cannot be used; the message names the file and the record."""


@dataclass(frozen=True)
class Alignment:
    """One multiple sequence alignment (see the module docstring for the encoding).

    ids: the N record ids; tokens: (N, L) uint8 tokenizer ids and :data:`GAP`; query: the row of
    the query; columns: (L,) int64, the query residue of each column (-1 where the query has a
    gap); path: the file it was read from (for messages)."""

    ids: list[str]
    tokens: np.ndarray
    query: int
    columns: np.ndarray
    path: str

    @property
    def query_sequence(self) -> str:
        """The query's residues on the alignment's columns (gaps left out)."""
        row = self.tokens[self.query]
        return Tokenizer().decode(row[row != GAP])


def _table() -> np.ndarray:
    """256-entry byte -> code table: residue letters (either case) -> tokenizer ids, ``-`` and
    ``.`` -> GAP, anything else -> invalid."""
    table = np.full(256, _INVALID, dtype=np.uint8)
    first = Tokenizer.mask_id + 1
    for i, aa in enumerate(RESIDUES):
        table[ord(aa)] = table[ord(aa.lower())] = first + i
    table[ord("-")] = table[ord(".")] = GAP
    return table


TABLE = _table()


def _insertions(text: str) -> np.ndarray:
    """A3M's insert characters (lowercase letters and ``.``) of one row, as a boolean mask."""
    raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return ((raw >= ord("a")) & (raw <= ord("z"))) | (raw == ord("."))


def _where(path: str, rid: str, line: int | None) -> str:
    return f"{path}: record {rid!r}" + (f" (header line {line})" if line else "")


def _encode(path: str, rid: str, line: int | None, text: str) -> np.ndarray:
    """Codes of one aligned row; an unknown character is an :class:`AlignmentError`."""
    try:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError as e:
        raise AlignmentError(
            f"{_where(path, rid, line)}: non-ASCII character at position {e.start + 1} of its aligned sequence"
        ) from None
    codes = TABLE[raw]
    bad = np.flatnonzero(codes == _INVALID)
    if bad.size:
        char = chr(raw[bad[0]])
        raise AlignmentError(
            f"{_where(path, rid, line)}: invalid character {char!r} at position {bad[0] + 1} of its aligned sequence "
            f"(allowed: the letters {RESIDUES} in either case, '-' and '.')"
        )
    return codes


def _open_text(path: Path):
    """Text lines of a plain or gzipped file; a non-ASCII byte reads as U+FFFD, which :func:`_encode`
    reports with its record."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


def _fasta_records(path: Path) -> list[tuple[str, str, int]]:
    """``(id, aligned text, header line)`` of each record of a FASTA / A3M file; ``#`` lines
    before the first header (HH-suite's A3M comment) are skipped."""
    records: list[tuple[str, str, int]] = []
    rid, parts, start = None, [], 0
    with _open_text(path) as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if line.startswith(">"):
                if rid is not None:
                    records.append((rid, "".join(parts), start))
                words = line[1:].split()
                rid, parts, start = (words[0] if words else f"record{len(records) + 1}"), [], number
            elif rid is None:
                if line and not line.startswith("#"):
                    raise AlignmentError(f"{path}: line {number}: sequence before the first '>' header")
            else:
                parts.append("".join(line.split()))
    if rid is not None:
        records.append((rid, "".join(parts), start))
    return records


def _query_index(path: str, ids: list[str], query: str | None) -> int:
    if not ids:
        raise AlignmentError(f"{path}: no record, so no query; give an alignment whose first record is the query")
    if query is None:
        return 0
    if query not in ids:
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise AlignmentError(f"{path}: no record {query!r} to use as the query (records: {shown})")
    return ids.index(query)


def _assemble(
    path: str, ids: list[str], lines: list[int | None], codes: list[np.ndarray], match: list[np.ndarray], query: int
) -> Alignment:
    """Rows on the match columns, all of the query's length; ``columns`` from the query's residues
    over all its characters (insertions count as residues of the query's sequence)."""
    q_codes, q_match = codes[query], match[query]
    residue = q_codes != GAP
    position = np.cumsum(residue) - 1
    columns = np.where(residue, position, -1)[q_match].astype(np.int64)
    n_cols = int(q_match.sum())
    if n_cols == 0:
        raise AlignmentError(f"{path}: the query {ids[query]!r} has no aligned column")
    tokens = np.empty((len(ids), n_cols), dtype=np.uint8)
    for n, (rid, line, c, m) in enumerate(zip(ids, lines, codes, match)):
        row = c[m]
        if row.size != n_cols:
            raise AlignmentError(
                f"{_where(path, rid, line)}: {row.size} aligned columns where the query {ids[query]!r} has "
                f"{n_cols} (ragged rows: every row must cover the same columns)"
            )
        tokens[n] = row
    return Alignment(ids=list(ids), tokens=tokens, query=query, columns=columns, path=path)


def fasta_is_aligned(path: str | Path) -> bool:
    """Whether a FASTA file is an alignment: at least two records, all of one length, and a gap
    (``-`` or ``.``) in one of them; otherwise it holds unaligned sequences (homologs to align)."""
    records = _fasta_records(Path(path))
    lengths = {len(text) for _, text, _ in records}
    return len(records) > 1 and len(lengths) == 1 and any("-" in t or "." in t for _, t, _ in records)


def fasta_sequences(path: str | Path) -> list[tuple[str, str]]:
    """``(id, sequence)`` of every record of a FASTA file, gap characters removed, upper case."""
    return [(rid, text.replace("-", "").replace(".", "").upper()) for rid, text, _ in _fasta_records(Path(path))]


def read_a3m(path: str | Path, query: str | None = None) -> Alignment:
    """An A3M file: insertions (lowercase letters and ``.``) dropped, the query first unless named."""
    path = Path(path)
    records = _fasta_records(path)
    ids = [rid for rid, _, _ in records]
    q = _query_index(str(path), ids, query)
    codes = [_encode(str(path), rid, line, text) for rid, text, line in records]
    match = [~_insertions(text) for _, text, _ in records]
    return _assemble(str(path), ids, [line for _, _, line in records], codes, match, q)


def read_fasta_alignment(path: str | Path, query: str | None = None) -> Alignment:
    """An aligned FASTA file: every column kept (lowercase letters are residues, ``-`` / ``.`` gaps)."""
    path = Path(path)
    records = _fasta_records(path)
    ids = [rid for rid, _, _ in records]
    q = _query_index(str(path), ids, query)
    codes = [_encode(str(path), rid, line, text) for rid, text, line in records]
    return _assemble(str(path), ids, [line for _, _, line in records], codes, [np.ones(len(c), bool) for c in codes], q)


def _stockholm_lengths(path: Path) -> str:
    """Which record's length differs from the first one's (Biopython only says that one does)."""
    lengths: dict[str, int] = {}
    with _open_text(path) as fh:
        for line in fh:
            words = line.split()
            if len(words) == 2 and not line.startswith(("#", "//")):
                lengths[words[0]] = lengths.get(words[0], 0) + len(words[1])
    if not lengths:
        return "no sequence line"
    first, n = next(iter(lengths.items()))
    odd = [rid for rid, m in lengths.items() if m != n]
    return f"record {odd[0]!r} has {lengths[odd[0]]} columns, {first!r} {n}" if odd else "a repeated identifier"


def read_stockholm(path: str | Path, query: str | None = None) -> Alignment:
    """A Stockholm file (the first alignment in it) through ``Bio.AlignIO``; insert columns (``#=GC
    RF`` ``.`` / ``-``, or without RF every column holding a lowercase letter) are dropped."""
    from Bio import AlignIO

    path = Path(path)
    try:
        with _open_text(path) as fh:
            aln = next(AlignIO.parse(fh, "stockholm"), None)
    except ValueError as e:
        why = _stockholm_lengths(path) if "length" in str(e) else str(e)
        raise AlignmentError(f"{path}: not a usable Stockholm alignment: {why} (ragged rows?)") from None
    ids = [record.id for record in aln] if aln is not None else []
    q = _query_index(str(path), ids, query)
    texts = [str(record.seq) for record in aln]
    codes = [_encode(str(path), rid, None, text) for rid, text in zip(ids, texts)]
    rf = aln.column_annotations.get("reference_annotation")
    if rf is not None:
        match = np.array([c not in ".-" for c in rf], dtype=bool)
    else:
        raw = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8).reshape(len(texts), -1)
        match = ~((raw >= ord("a")) & (raw <= ord("z"))).any(0)
    return _assemble(str(path), ids, [None] * len(ids), codes, [match] * len(ids), q)


def read_alignment(path: str | Path, query: str | None = None, format: str | None = None) -> Alignment:
    """Read an A3M, Stockholm or aligned FASTA file (``format``: "a3m", "stockholm", "fasta"; by
    default from the file name, see the module docstring). ``query``: the query's record id
    (default: the first record)."""
    path = Path(path)
    if not path.is_file():
        raise AlignmentError(f"{path}: alignment file not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    fmt = format or SUFFIXES.get(Path(name).suffix.lower(), "fasta")
    readers = {"a3m": read_a3m, "stockholm": read_stockholm, "fasta": read_fasta_alignment}
    if fmt not in readers:
        raise AlignmentError(f"{path}: unknown alignment format {fmt!r}; use one of {sorted(readers)}")
    aln = readers[fmt](path, query)
    log.info("%s: %d sequences x %d columns (%s), query %r", path, *aln.tokens.shape, fmt, aln.ids[aln.query])
    return aln


def filter_gaps(aln: Alignment, max_row_gap: float = MAX_ROW_GAP, max_col_gap: float = MAX_COL_GAP) -> Alignment:
    """The alignment on the query's residues, without gappy rows and columns, in this order:
    (1) columns where the query has a gap are dropped; (2) rows gapped in more than ``max_row_gap``
    of the remaining columns are dropped (never the query: it has no gap left); (3) columns
    gapped in more than ``max_col_gap`` of the remaining rows are dropped. ``columns`` keeps the
    query position of every kept column, so contacts map back onto the query."""
    keep_cols = aln.columns >= 0
    if not keep_cols.any():
        raise AlignmentError(f"{aln.path}: empty after filtering: the query {aln.ids[aln.query]!r} has no residue")
    gaps = aln.tokens[:, keep_cols] == GAP
    keep_rows = gaps.mean(1) <= max_row_gap
    keep_rows[aln.query] = True
    col_gap = gaps[keep_rows].mean(0)
    keep_cols[keep_cols] = col_gap <= max_col_gap
    if keep_rows.sum() < 2 or not keep_cols.any():
        raise AlignmentError(
            f"{aln.path}: empty after filtering: {int(keep_rows.sum()) - 1} sequence(s) besides the query "
            f"with at most {max_row_gap:.0%} gaps, {int(keep_cols.sum())} column(s) with at most "
            f"{max_col_gap:.0%} gaps; give more homologs or loosen max_row_gap / max_col_gap"
        )
    rows = np.flatnonzero(keep_rows)
    log.info(
        "%s: kept %d of %d sequences and %d of %d columns",
        aln.path,
        len(rows),
        len(aln.ids),
        int(keep_cols.sum()),
        len(aln.columns),
    )
    return replace(
        aln,
        ids=[aln.ids[r] for r in rows],
        tokens=aln.tokens[np.ix_(rows, np.flatnonzero(keep_cols))],
        query=int(np.searchsorted(rows, aln.query)),
        columns=aln.columns[keep_cols],
    )


def sequence_weights(tokens: np.ndarray, threshold: float = IDENTITY_THRESHOLD, chunk: int = 1024) -> np.ndarray:
    """DCA sequence weights ``w_n = 1 / #{m : id(n, m) >= threshold}`` (m = n included), (N,) float64.

    ``id(n, m)`` is the fraction of identical symbols over all L columns of the alignment, a gap
    facing a gap counting as identical: the plmDCA / GREMLIN / CCMpred convention (identity over
    the aligned length). Computed as one-hot matrix products, ``chunk`` rows against all at a
    time: memory ``N * L * S * 4`` bytes for S distinct symbols (0.5 GB at N 20,000, L 300, S 21)
    plus ``chunk * N * 4``, never N x N."""
    tokens = np.asarray(tokens)
    n, length = tokens.shape
    symbols = np.unique(tokens)
    onehot = (tokens[:, :, None] == symbols).reshape(n, length * len(symbols)).astype(np.float32)
    need = math.ceil(threshold * length - 1e-9)  # identical columns for id >= threshold; counts are exact in float32
    neighbours = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        same = onehot[start : start + chunk] @ onehot.T  # (chunk, N): identical columns of each pair
        neighbours[start : start + chunk] = (same >= need - 0.5).sum(1)
    return 1.0 / neighbours


def n_eff(tokens: np.ndarray, threshold: float = IDENTITY_THRESHOLD) -> float:
    """The effective number of sequences, ``sum_n w_n`` (:func:`sequence_weights`)."""
    return float(sequence_weights(tokens, threshold).sum())
