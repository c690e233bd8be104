"""Streaming FASTA reader: equal to Biopython's SimpleFastaParser, wrapped/\\r\\n/lowercase input,
block boundaries, byte ranges, line numbers and offsets, and every kind of unreadable input."""

from __future__ import annotations

import gzip
import random
from bisect import bisect_left
from itertools import accumulate

import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.data.fasta import FastaFormatError, find_record_start, iter_batches, read_fasta


def _sfp(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        return list(SimpleFastaParser(fh))


@pytest.fixture(scope="module")
def sample_records(sample_fasta):
    return _sfp(sample_fasta)


@pytest.fixture(scope="module")
def plain_sample(sample_fasta, tmp_path_factory):
    p = tmp_path_factory.mktemp("plain") / "uniprot_sample.fasta"
    p.write_bytes(gzip.decompress(sample_fasta.read_bytes()))
    return p


def test_equals_simplefastaparser_on_real_sample(sample_fasta, sample_records):
    recs = list(read_fasta(sample_fasta))
    assert len(recs) == len(sample_records) == 3000
    for r, (h, s) in zip(recs, sample_records):
        assert r.header.decode() == h
        assert r.sequence.decode() == s


def test_lines_and_offsets_point_at_headers(plain_sample):
    data = plain_sample.read_bytes()
    recs = list(read_fasta(plain_sample, block_size=5000))
    for r in recs[::97]:
        assert data[r.offset : r.offset + 1] == b">"
        assert data[: r.offset].count(b"\n") + 1 == r.line
        assert data[r.offset + 1 :].split(b"\n", 1)[0] == r.header


def test_block_size_does_not_change_records(plain_sample, sample_records):
    # blocks much smaller than most records: records span many blocks
    small = [(r.header.decode(), r.sequence.decode()) for r in read_fasta(plain_sample, block_size=97)]
    assert small == sample_records


def test_crlf_rewrapped_lowercase_and_stop(tmp_path, sample_records):
    rng = random.Random(0)
    chosen = sample_records[:300]
    out = []
    for h, s in chosen:
        w = rng.choice([1, 7, 60, 80, 10_000])
        body = "\r\n".join(s[i : i + w] for i in range(0, len(s), w))
        out.append(f">{h}\r\n{body.lower()}*\r\n")
    p = tmp_path / "crlf.fa"
    p.write_text("\n\n" + "".join(out))  # leading blank lines are allowed
    recs = list(read_fasta(p, block_size=1024))
    assert [r.header.decode() for r in recs] == [h for h, _ in chosen]
    assert [r.sequence.decode() for r in recs] == [s.lower() + "*" for _, s in chosen]
    assert recs[0].line == 3


def test_byte_ranges_partition_the_records(plain_sample, sample_records):
    size = plain_sample.stat().st_size
    rng = random.Random(1)
    cuts = sorted({0, size, *(rng.randrange(1, size) for _ in range(6))})
    got = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        got += [
            (r.header.decode(), r.sequence.decode()) for r in read_fasta(plain_sample, start=a, end=b, block_size=4096)
        ]
    assert got == sample_records
    data = plain_sample.read_bytes()
    for c in cuts[1:-1]:
        s = find_record_start(plain_sample, c)
        assert data[s : s + 1] == b">" and data[s - 1 : s] == b"\n" and s >= c
        assert b"\n>" not in data[c - 1 : s]


@pytest.mark.parametrize("gz", [False, True])
def test_resume_offsets_continue_exactly(plain_sample, sample_fasta, sample_records, gz):
    src = sample_fasta if gz else plain_sample
    batches = list(iter_batches(src, block_size=20_000))
    mid = batches[len(batches) // 2]
    rest = list(read_fasta(src, start=mid.end_offset, line0=mid.end_line))
    n_before = sum(len(b) for b in batches[: len(batches) // 2 + 1])
    assert [(r.header.decode(), r.sequence.decode()) for r in rest] == sample_records[n_before:]
    assert rest[0].line == list(read_fasta(plain_sample))[n_before].line


def test_multimember_gzip(tmp_path, sample_records):
    # BGZF and `cat a.gz b.gz` are multi-member gzip streams
    text = [f">{h}\n{s}\n" for h, s in sample_records[:50]]
    p = tmp_path / "multi.fa.gz"
    p.write_bytes(gzip.compress("".join(text[:20]).encode()) + gzip.compress("".join(text[20:]).encode()))
    assert len(list(read_fasta(p))) == 50


@pytest.mark.parametrize(
    "content, match, line",
    [
        (b"", "empty file", None),
        (b"\n  \n\n", "empty file", None),
        (b"MKVLAAGIVGLLLA\n>sp|P1|X\nMKV\n", "not FASTA", 1),
        (b"\n\nACGT\n", "not FASTA", 3),
        (b"\x89HDF\r\n\x1a\n\x00\x00\x00", "binary", 1),
        (b"\xef\xbb\xbf\n \n", "empty file", None),  # a UTF-8 byte-order mark and blanks
        (b">id\nMKV\n\nMK\x00\x00\x00V\n", "binary content .a NUL byte.", 4),
        (b">id\nMKV\n" + bytes(range(1, 32)) * 40, "binary content .*control bytes", 3),
        (b"BZh91AY&SY\x12\x34", "bzip2-compressed", 1),
        (">id\nMKV\n".encode("utf-16"), "UTF-16", 1),
        ("\ufeffMKV\n>id\n".encode(), "not FASTA", 1),
    ],
)
def test_unreadable_plain_input(tmp_path, content, match, line):
    p = tmp_path / "bad.fa"
    p.write_bytes(content)
    with pytest.raises(FastaFormatError, match=match) as e:
        list(read_fasta(p))
    assert str(p) in str(e.value)
    assert e.value.line == line


def test_truncated_and_corrupt_gzip(tmp_path, sample_fasta):
    blob = sample_fasta.read_bytes()
    trunc = tmp_path / "trunc.fa.gz"
    trunc.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(FastaFormatError, match="truncated or corrupt gzip") as e:
        list(read_fasta(trunc))
    assert str(trunc) in str(e.value)
    corrupt = tmp_path / "corrupt.fa.gz"
    corrupt.write_bytes(blob[:5000] + bytes(2000) + blob[7000:])
    with pytest.raises(FastaFormatError, match="gzip") as e:
        list(read_fasta(corrupt))
    assert str(corrupt) in str(e.value)


def _reference_split(block: bytes, pos: int, line: int, end, table):
    """The straightforward record split (bytes.split on '\\n>', partition, count per record), the
    reference for the faster re.split-based _split_block."""
    parts = block.split(b"\n>")
    parts[0] = parts[0][1:]
    sizes = [len(p) + 2 for p in parts]
    nls = [p.count(b"\n") + 1 for p in parts]
    sizes[-1] -= 1
    nls[-1] -= 1
    offsets = list(accumulate(sizes, initial=pos))
    lines = list(accumulate(nls, initial=line))
    k = len(parts)
    stop = end is not None and offsets[-2] >= end
    if stop:
        k = bisect_left(offsets, end, 0, len(parts))
    hb = [p.partition(b"\n") for p in parts[:k]]
    headers = [h.rstrip(b"\r") if b"\r" in block else h for h, _, _ in hb]
    seqs = [body.translate(table, b"\n\r \t\v\f") for _, _, body in hb]
    return headers, seqs, lines[:k], offsets[:k], lines[k], offsets[k], stop


def test_split_block_matches_reference_on_odd_blocks():
    """Headers, sequences, lines, offsets and the byte-range cut on blocks with every oddity:
    header-only records, empty headers, CR, blanks/tabs inside sequences, '>' inside a header,
    no final newline; with and without a translation table."""
    from protein_performer.data.fasta import _split_block
    from protein_performer.data.ingest import token_table

    rng = random.Random(0)
    pieces = [b"ACD", b"\n", b"\r\n", b" ", b"\t", b"EF*", b"x", b"\n\n", b"MKV" * 30]
    for _ in range(3000):
        recs = []
        for _ in range(rng.randint(1, 6)):
            header = rng.choice([b"", b"sp|P1|X a b", b"id\r", b"a\tb", b"q > r", b"UniRef50_Q1 n=2"])
            body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
            sep = rng.choice([b"\n", b"\r\n"]) if body or rng.random() < 0.7 else b""
            recs.append(b">" + header + sep + body)
        block = b"\n".join(recs) + rng.choice([b"", b"\n"])
        end = rng.choice([None, rng.randint(0, len(block) + 3)])
        for table in (None, token_table()):
            batch, line, offset, stop = _split_block(block, 5, 3, end, table)
            got = (batch.headers, batch.sequences, batch.lines, batch.offsets, line, offset, stop)
            assert got == _reference_split(block, 5, 3, end, table), (block, end)


@pytest.mark.parametrize("n", [100, 4096, 1 << 20, 16 << 20])
def test_threaded_gzip_reader_returns_the_stream_in_order(sample_fasta, n):
    """read(n): at least n bytes (but the last), at most 2 n, the exact decompressed stream; seek
    skips forward; pieces larger than 2 n are handed out in parts."""
    from protein_performer.data.gzip_stream import ThreadedGzipReader

    want = gzip.decompress(sample_fasta.read_bytes())
    reader = ThreadedGzipReader(sample_fasta)
    try:
        reader.seek(12345)
        got = [want[:12345]]
        while chunk := reader.read(n):
            assert isinstance(chunk, bytes) and (
                n <= len(chunk) <= 2 * n or sum(map(len, got)) + len(chunk) == len(want)
            )
            got.append(chunk)
        assert b"".join(got) == want
    finally:
        reader.close()
