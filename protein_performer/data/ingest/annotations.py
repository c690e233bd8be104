"""Held-out (out-of-distribution) families: which records belong to them.

A record is in a held-out family when its accession is annotated with one (TSV files, read here
into a set of accessions) or when its header names one as a ``PF01234`` token. The resolve step
then puts every sequence with such a record into the ``ood`` split.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from collections.abc import Iterable
from itertools import accumulate

from protein_performer.data.fasta import open_binary

from .common import IngestError

log = logging.getLogger(__name__)

_FAMILY_TOKEN_RE = re.compile(rb"PF\d{5}")
# first-column names of a plain ``accession<TAB>family`` table with a header line
_ACCESSION_HEADERS = (b"accession", b"acc", b"uniprot_acc", b"pfamseq_acc", b"id")


def load_ood_accessions(paths: Iterable[str], families: Iterable[str]) -> set[bytes]:
    """Accessions (bytes, without version) annotated with one of ``families``, from TSV files.

    Layouts, detected by the header line: Pfam's ``Pfam-A.regions.uniprot.tsv`` (a ``pfamA_acc``
    column; the accession is the first column), the ``accession hmm hmm_acc ...`` hits table
    (family by name or accession), or a plain ``accession<TAB>family`` table (header optional).
    The file is streamed; only the accessions of the wanted families are kept.
    """
    wanted = {f.encode() for f in families}
    accessions: set[bytes] = set()
    if not wanted:
        return accessions
    for path in paths:
        with open_binary(path) as fh:
            first = fh.readline()
            columns = [c.strip().lower() for c in first.rstrip(b"\r\n").split(b"\t")]
            accession_col, family_cols, has_header = _layout(columns)
            if not has_header:
                fh.seek(0)
            _read_annotations(path, fh, accession_col, family_cols, wanted, accessions)
    log.info("annotations: %d accessions in the %d held-out families", len(accessions), len(wanted))
    return accessions


def _layout(columns: list[bytes]) -> tuple[int, list[int], bool]:
    """(accession column, family columns, whether the first line is a header) of an annotation table."""
    if b"pfama_acc" in columns:
        return 0, [columns.index(b"pfama_acc")], True
    if b"hmm" in columns or b"hmm_acc" in columns:
        accession_col = columns.index(b"accession") if b"accession" in columns else 0
        return accession_col, [columns.index(c) for c in (b"hmm", b"hmm_acc") if c in columns], True
    if columns and columns[0] in _ACCESSION_HEADERS and len(columns) >= 2:
        return 0, [1], True
    # no header: plain two columns, or the regions layout (7 columns, PF in the 5th)
    return 0, ([4] if len(columns) == 7 else [1]), False


def _read_annotations(path, fh, accession_col: int, family_cols: list[int], wanted: set[bytes], accessions: set[bytes]):
    """Add to ``accessions`` those of ``fh``'s rows whose family is in ``wanted``."""
    n_lines = 0
    for line in fh:
        n_lines += 1
        fields = line.rstrip(b"\r\n").split(b"\t")
        if len(fields) <= max(family_cols):
            if line.strip():
                raise IngestError(
                    f"{path}:{n_lines + 1}: annotation line has {len(fields)} tab-separated columns, "
                    f"expected at least {max(family_cols) + 1}; fix the file or remove it from annotations"
                )
            continue
        for col in family_cols:
            family = fields[col].strip()
            if family[:2] == b"PF":
                family = family.split(b".")[0]
            if family in wanted:
                accessions.add(fields[accession_col].strip().split(b".")[0])
                break


def records_with_family_token(headers: list[bytes], families: set[bytes]) -> list[int]:
    """Indices of the headers that name one of ``families`` (``PF01234`` tokens).

    One regex scan over the batch's joined headers instead of a Python test per record: most
    batches have no such token at all, and a hit is mapped back to its header by bisection.
    """
    joined = b"\n".join(headers)
    if b"PF" not in joined:
        return []
    hits = [m.start() for m in _FAMILY_TOKEN_RE.finditer(joined) if m.group() in families]
    if not hits:
        return []
    starts = list(accumulate((len(h) + 1 for h in headers), initial=0))
    return [bisect_right(starts, pos) - 1 for pos in hits]
