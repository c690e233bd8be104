"""Headers are text whatever their encoding: UTF-8, Latin-1 and Windows-1252 headers, in the first
KiB and deep in the file (> 1 MiB in), plain and gzip, one worker, two workers (byte ranges) and
part + merge: every valid record is stored and each id is the header's text. A non-ASCII byte in a
sequence line rejects that record only; NUL bytes still make the file binary (file and line named).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.data.fasta import FastaFormatError, decode_header, read_fasta
from protein_performer.data.ingest import ingest

ALL_TRAIN = {"train": 1.0, "valid": 0.0, "test": 0.0}

# (header bytes, the id ingest must store): the id is the header's first word (accession for sp|/tr|)
ODD_HEADERS = [
    ("sp|Q0CAF1|CAF1_HUMAN Protéine café OS=Homo sapiens".encode(), "Q0CAF1"),  # UTF-8 description
    ("café_u8 Ä-protein".encode(), "café_u8"),  # UTF-8 id
    ("Ä-u8 Äpfel".encode(), "Ä-u8"),
    ("café_l1 Protéine Äpfel".encode("latin-1"), "café_l1"),  # Latin-1 id
    ("tr|Q0LAT1|Q0LAT1_9ZZZZ Größe ß".encode("latin-1"), "Q0LAT1"),  # Latin-1 description
    ("\u201cquoted\u201d_w \u2013 dash \u20ac".encode("cp1252"), "\u201cquoted\u201d_w"),  # 0x93 0x94 0x96 0x80
    (b"und\x81ef_w \x8d\x9d", "und\x81ef_w"),  # bytes Windows-1252 leaves undefined: Latin-1
]


def test_decode_header_rule():
    assert decode_header("café Ä".encode()) == "café Ä"
    assert decode_header("café Ä".encode("latin-1")) == "café Ä"
    assert decode_header("\u201cx\u201d \u2013 \u20ac".encode("cp1252")) == "\u201cx\u201d \u2013 \u20ac"
    assert decode_header(b"a\x81b\x9d") == "a\x81b\x9d"
    # never fails, and distinct bytes give distinct text (nothing is replaced by U+FFFD)
    singles = [decode_header(bytes([b])) for b in range(256)]
    assert len(set(singles)) == 256 and "\ufffd" not in singles


@pytest.fixture(scope="module")
def real(sample_fasta):
    with gzip.open(sample_fasta, "rt") as fh:
        recs = list(SimpleFastaParser(fh))
    seen, out = set(), []
    for h, s in recs:  # unique sequences and ids: every valid record is then stored
        if s not in seen and set(s) <= set("ACDEFGHIKLMNPQRSTVWYXBZUO"):
            seen.add(s)
            out.append((h, s))
    return out


def _deep(raw: bytes, rid: str) -> tuple[bytes, str]:
    """The second copy of an odd header, with another id."""
    if raw[:3] in (b"sp|", b"tr|"):
        return raw.replace(b"Q0", b"Q9", 1), rid.replace("Q0", "Q9", 1)
    return b"deep-" + raw, "deep-" + rid


def _odd_file(real, tmp_path: Path, gz: bool) -> tuple[Path, list[str], int]:
    """Real records; the ODD_HEADERS head the first records (short sequences: several fall in the
    first KiB) and come again past 1.2 MiB with other ids. Returns the file, the ids in file order
    and the byte offset of the first deep odd header."""
    chunks, ids = [], []
    size, deep_at, k = 0, None, 0
    for i, (h, s) in enumerate(real):
        if i < len(ODD_HEADERS):
            (raw, rid), s = ODD_HEADERS[i], s[:60]
        elif size > 1_200_000 and k < len(ODD_HEADERS):
            deep_at = size if deep_at is None else deep_at
            raw, rid = _deep(*ODD_HEADERS[k])
            k += 1
        else:
            raw, rid = h.encode(), h.split()[0].split("|")[1]
        rec = b">" + raw + b"\n" + "\n".join(s[j : j + 60] for j in range(0, len(s), 60)).encode() + b"\n"
        chunks.append(rec)
        ids.append(rid)
        size += len(rec)
    data = b"".join(chunks)
    assert deep_at is not None and k == len(ODD_HEADERS)
    assert sum(1 for raw, _ in ODD_HEADERS if raw in data[:1024]) >= 5  # most odd headers in the first KiB
    assert len(set(ids)) == len(ids)
    p = tmp_path / ("odd.fasta.gz" if gz else "odd.fasta")
    p.write_bytes(gzip.compress(data, 1) if gz else data)
    return p, ids, deep_at


def _stored_ids(out: Path) -> list[str]:
    m = json.loads((out / "manifest.json").read_text())
    ids = []
    for sh in m["splits"]["train"]["shards"]:
        with h5py.File(out / sh["path"], "r") as f:
            ids += list(f["ids"].asstr()[:])
    return ids


@pytest.mark.parametrize("gz", [False, True])
def test_odd_headers_read_and_ingested(real, tmp_path, gz):
    p, ids, deep_at = _odd_file(real, tmp_path, gz)
    recs = list(read_fasta(p))
    assert len(recs) == len(ids)
    assert any(r.offset > deep_at and not r.header.isascii() for r in recs)
    assert [r.header_text.split()[0] for r in recs if not r.header.isascii()][:3] == [
        "sp|Q0CAF1|CAF1_HUMAN",
        "café_u8",
        "Ä-u8",
    ]
    out = tmp_path / "o"
    m = ingest(input=str(p), output_dir=str(out), progress=False, fractions=ALL_TRAIN, shard_size=1000)
    assert m["rejected"] == {} and m["n_records"] == m["n_unique"] == len(ids)
    assert _stored_ids(out) == ids
    for _, rid in ODD_HEADERS:  # both copies: near the start and deep in the file
        assert rid in ids and _deep(b"", rid)[1] in ids or _deep(b"sp|", rid)[1] in ids


def test_odd_headers_with_two_workers_and_part_merge(real, tmp_path):
    p, ids, deep_at = _odd_file(real, tmp_path, gz=False)
    kw = dict(input=str(p), progress=False, fractions=ALL_TRAIN, shard_size=1000)
    one = ingest(output_dir=str(tmp_path / "one"), **kw)
    two = ingest(output_dir=str(tmp_path / "two"), workers=2, **kw)
    for part in (0, 1):
        ingest(output_dir=str(tmp_path / "parts"), part=part, num_parts=2, **kw)
    merged = ingest(output_dir=str(tmp_path / "parts"), merge=True, progress=False)
    assert p.stat().st_size // 2 < deep_at  # the deep odd headers are in the second byte range
    for m, d in ((one, "one"), (two, "two"), (merged, "parts")):
        assert m["rejected"] == {} and m["n_unique"] == len(ids), d
        assert _stored_ids(tmp_path / d) == ids, d


def test_non_ascii_in_a_sequence_rejects_the_record_only(real, tmp_path):
    """In the first KiB and deep in the file, plain and gzip: rejected as invalid_character with
    the byte named, listed in rejects.tsv; every other record kept."""
    recs = [(h, s) for h, s in real[:2400]]
    bad = {0: "é".encode(), 2: b"\xe9", 2300: "Ä".encode(), 2301: b"\x93"}
    chunks = []
    for i, (h, s) in enumerate(recs):
        body = s.encode()
        if i in bad:
            body = body[:7] + bad[i] + body[7:]
        chunks.append(b">" + h.encode() + b"\n" + body + b"\n")
    data = b"".join(chunks)
    assert data.index(bad[0]) < 1024 and data.index(b"\x93") > 1 << 20
    for gz in (False, True):
        p = tmp_path / ("seq.fa.gz" if gz else "seq.fa")
        p.write_bytes(gzip.compress(data) if gz else data)
        out = tmp_path / f"o{gz}"
        m = ingest(input=str(p), output_dir=str(out), progress=False, fractions=ALL_TRAIN)
        assert m["rejected"] == {"invalid_character": 4} and m["n_unique"] == len(recs) - 4
        rows = [r.split("\t") for r in (out / "rejects.tsv").read_text(encoding="utf-8").splitlines()[1:]]
        assert [(r[2], r[3]) for r in rows] == [(recs[i][0].split("|")[1], "invalid_character") for i in sorted(bad)]
        assert [r[4] for r in rows] == [f"non-ASCII byte 0x{bad[i][0]:02x} at residue 8" for i in sorted(bad)]


@pytest.mark.parametrize("where", ["first_block", "deep"])
@pytest.mark.parametrize("gz", [False, True])
def test_nul_bytes_still_refuse_the_file_with_its_line(real, tmp_path, where, gz):
    text = "".join(f">{h}\n{s}\n" for h, s in real[:2500]).encode()
    at = 500 if where == "first_block" else text.index(b"\n>", 1_300_000) + 1
    at = text.index(b"\n", at) + 1  # the start of a line
    data = text[:at] + b"\x00" * 64 + text[at:]
    line = text[:at].count(b"\n") + 1
    p = tmp_path / ("nul.fa.gz" if gz else "nul.fa")
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(FastaFormatError, match="binary content .a NUL byte") as e:
        ingest(input=str(p), output_dir=str(tmp_path / "o"), progress=False)
    assert e.value.line == line and f"{p}:{line}:" in str(e.value)
    assert not (tmp_path / "o" / "manifest.json").exists()
    if not gz:  # the byte range of the second worker names the absolute line too
        with pytest.raises(FastaFormatError) as e2:
            ingest(input=str(p), output_dir=str(tmp_path / "o2"), progress=False, workers=2)
        assert e2.value.line == line
