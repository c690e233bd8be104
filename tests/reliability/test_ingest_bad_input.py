"""Bad input: a clear error naming the file (and line), or a counted and listed reject; nothing lost,
no partial output. Built from real records of the embedded sample, with the defects injected."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.data.fasta import FastaFormatError
from protein_performer.data.ingest import IngestError, ingest


@pytest.fixture(scope="module")
def real(sample_fasta):
    with gzip.open(sample_fasta, "rt") as fh:
        return list(SimpleFastaParser(fh))[:400]


def _no_output(out: Path):
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*/*.h5")) and not list(out.glob("*/.*.partial"))


@pytest.mark.parametrize("kind", ["not_fasta", "binary", "empty", "truncated_gzip"])
def test_unreadable_input_names_the_file(kind, real, sample_fasta, tmp_path):
    text = "".join(f">{h}\n{s}\n" for h, s in real)
    if kind == "not_fasta":
        p = tmp_path / "proteins.txt"
        p.write_text("\n".join(s for _, s in real))  # sequences without headers
        match = "not FASTA"
    elif kind == "binary":
        p = tmp_path / "shard.fa"
        ingest(input=str(sample_fasta), output_dir=str(tmp_path / "first"), progress=False)
        p.write_bytes((tmp_path / "first/train/shard-00000.h5").read_bytes())  # an HDF5 file
        match = "binary"
    elif kind == "empty":
        p = tmp_path / "empty.fa.gz"
        p.write_bytes(gzip.compress(b""))
        match = "empty file"
    else:
        p = tmp_path / "trunc.fa.gz"
        blob = gzip.compress(text.encode() * 3)
        p.write_bytes(blob[: int(len(blob) * 0.8)])  # dies after several blocks were processed
        match = "truncated or corrupt gzip"
    out = tmp_path / "o"
    with pytest.raises(FastaFormatError, match=match) as e:
        ingest(input=str(p), output_dir=str(out), progress=False, block_size=20_000)
    assert str(p) in str(e.value)
    _no_output(out)


def _bad_file(real, tmp_path) -> tuple[Path, dict]:
    """Real records with injected defects; returns the file and {line: (id, reason)} expected."""
    lines, expect = [], {}
    rec = list(real)

    def add(header, seq_lines, reason=None, rid=None):
        if reason:
            expect[len(lines) + 1] = (rid, reason)
        lines.append(f">{header}")
        lines.extend(seq_lines)

    for i, (h, s) in enumerate(rec[:300]):
        acc = h.split("|")[1]
        if i == 10:
            add(h, [s[:30] + "J" + s[31:]], "invalid_character", acc)
        elif i == 40:
            add(h, [s[:5] + "1" + s[6:]], "invalid_character", acc)
        elif i == 70:
            add(h, [s[:100] + "é" + s[101:]], "invalid_character", acc)  # non-ASCII after the first KiB
        elif i == 100:
            add(h, [], "header_only", acc)
        elif i == 130:
            add(h, ["*"], "empty_sequence", acc)
        elif i == 160:
            add(h, ["", "  "], "header_only", acc)  # blank lines only
        elif i == 190:
            add("", [s], "missing_id", "")
        else:
            add(h, [s[j : j + 60] for j in range(0, len(s), 60)])
    h0, s0 = rec[5]
    add(h0, [s0])  # same id, same sequence: a plain duplicate
    add(h0, [s0[::-1]], "duplicate_id_conflict", h0.split("|")[1])  # same id, other sequence
    add(rec[300][0], [], "header_only", rec[300][0].split("|")[1])  # header-only record at EOF
    p = tmp_path / "defects.fasta"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p, expect


def test_invalid_records_are_rejected_counted_and_listed(real, tmp_path):
    p, expect = _bad_file(real, tmp_path)
    out = tmp_path / "o"
    m = ingest(input=str(p), output_dir=str(out), progress=False)
    reasons = {}
    for _, r in expect.values():
        reasons[r] = reasons.get(r, 0) + 1
    assert m["rejected"] == reasons
    assert json.loads((out / "manifest.json").read_text())["rejected"] == reasons
    assert m["n_records"] == 300 + 3
    assert m["n_unique"] + m["n_duplicates"] + sum(m["rejected"].values()) == m["n_records"]
    rows = [r.split("\t") for r in (out / "rejects.tsv").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["file", "line", "id", "reason", "detail"]
    got = {int(r[1]): (r[2], r[3]) for r in rows[1:]}
    assert got == expect
    details = {int(r[1]): r[4] for r in rows[1:]}
    first_bad = min(k for k, v in expect.items() if v[1] == "invalid_character")
    assert details[first_bad] == "character 'J' at residue 31"
    assert all(r[0] == "defects.fasta" for r in rows[1:])
    kept = {i for s in m["splits"].values() for sh in s["shards"] for i in _ids(out / sh["path"])}
    assert not kept & {rid for rid, _ in expect.values()} - {real[5][0].split("|")[1]}
    assert real[5][0].split("|")[1] in kept  # the first record of the conflicting id stays


def _ids(path):
    import h5py

    with h5py.File(path, "r") as f:
        return [i.decode() if isinstance(i, bytes) else i for i in f["ids"][:]]


@pytest.mark.slow
def test_rejects_with_two_workers_have_absolute_lines(real, tmp_path):
    p, expect = _bad_file(real, tmp_path)
    single = ingest(input=str(p), output_dir=str(tmp_path / "a"), progress=False)
    two = ingest(input=str(p), output_dir=str(tmp_path / "b"), progress=False, workers=2)
    assert (tmp_path / "a/rejects.tsv").read_text() == (tmp_path / "b/rejects.tsv").read_text()
    assert two["rejected"] == single["rejected"] and two["n_unique"] == single["n_unique"]


@pytest.mark.parametrize("parts", [None, 2])
def test_strict_stops_at_first_bad_record_with_file_and_line(real, tmp_path, parts):
    p, expect = _bad_file(real, tmp_path)
    out = tmp_path / "o"
    kw = dict(input=str(p), output_dir=str(out), progress=False, strict=True)
    with pytest.raises(IngestError) as e:
        if parts:  # the second byte range: its line numbers must still be absolute
            ingest(**kw, part=1, num_parts=parts)
        else:
            ingest(**kw)
    msg = str(e.value)
    if parts:
        size = p.stat().st_size
        data = p.read_bytes()
        first_line = data[: data.index(b"\n>", size // 2) + 1].count(b"\n") + 1
        line = min(k for k in expect if k >= first_line)
    else:
        line = min(expect)
    assert f"{p}:{line}: record {expect[line][0]!r} rejected: {expect[line][1]}" in msg
    assert "strict=false" in msg
    _no_output(out)


def test_strict_duplicate_id_conflict(real, tmp_path):
    h, s = real[0]
    p = tmp_path / "dupid.fa"
    p.write_text(f">{h}\n{s}\n>{real[1][0]}\n{real[1][1]}\n>{h}\n{s[:-1]}\n")
    with pytest.raises(
        IngestError, match=rf"{p}:5: record '{h.split('|')[1]}' rejected: duplicate_id_conflict.*{p.name}:1"
    ):
        ingest(input=str(p), output_dir=str(tmp_path / "o"), progress=False, strict=True)
    _no_output(tmp_path / "o")
    m = ingest(input=str(p), output_dir=str(tmp_path / "o2"), progress=False)
    assert m["rejected"] == {"duplicate_id_conflict": 1} and m["n_unique"] == 2


def test_input_and_option_errors_are_clear(real, tmp_path):
    with pytest.raises(IngestError, match="input file not found: .*nope.fa"):
        ingest(input=str(tmp_path / "nope.fa"), output_dir=str(tmp_path / "o"))
    p = tmp_path / "ok.fa"
    p.write_text(f">{real[0][0]}\n{real[0][1]}\n")
    with pytest.raises(IngestError, match="fractions must"):
        ingest(input=str(p), output_dir=str(tmp_path / "o"), fractions={"train": 0.9, "valid": 0.2, "test": 0.1})
    with pytest.raises(IngestError, match="unknown ingest option 'shardsize'"):
        ingest(input=str(p), output_dir=str(tmp_path / "o"), shardsize=3)
    with pytest.raises(IngestError, match="one input file per part"):
        ingest(input=[str(p), str(p)], output_dir=str(tmp_path / "o"), part=0, num_parts=3)
    ann = tmp_path / "ann.tsv"
    ann.write_text("accession\tfamily\nP12345\n")
    with pytest.raises(IngestError, match=rf"{ann}:2: annotation line has 1 tab-separated columns"):
        ingest(input=str(p), output_dir=str(tmp_path / "o2"), annotations=str(ann), progress=False)


def test_errors_in_worker_processes_reach_the_caller(real, tmp_path, monkeypatch):
    """workers=2: a strict error in the forked worker's byte range is raised in the caller with
    its file and absolute line; a worker that dies is reported as such; no process is left."""
    import multiprocessing as mp
    import os

    import protein_performer.data.ingest as ing

    text = "".join(f">{h}\n{s}\n" for h, s in real)
    p = tmp_path / "late_bad.fa"
    p.write_text(text + ">sp|ZZZ9|BAD\nAC1DE\n")  # in the second half: the worker's unit
    line = text.count("\n") + 1
    with pytest.raises(IngestError, match=rf"{p}:{line}: record 'ZZZ9' rejected: invalid_character"):
        ingest(input=str(p), output_dir=str(tmp_path / "o"), progress=False, strict=True, workers=2)
    _no_output(tmp_path / "o")
    assert mp.active_children() == []

    parent = os.getpid()
    write = ing.workers.write_unit_shards

    def die_in_worker(*args):
        if os.getpid() != parent:
            os._exit(3)
        return write(*args)

    monkeypatch.setattr(ing.workers, "write_unit_shards", die_in_worker)
    with pytest.raises(IngestError, match="worker process died.*resume=true"):
        ingest(input=str(p), output_dir=str(tmp_path / "o2"), progress=False, workers=2)
    assert mp.active_children() == []


@pytest.mark.parametrize("bad_id", [False, True])
def test_non_ascii_ids_are_stored_as_utf8(real, tmp_path, bad_id):
    """Ids go to HDF5 as they are when the unit's ids are valid UTF-8, else decoded as
    Windows-1252 / Latin-1 (fasta.decode_header): either way the shard holds valid UTF-8 that reads back."""
    import h5py

    head = "".join(f">{h}\n{s}\n" for h, s in real[2:12]).encode()
    weird = b"\xff\xfeid" if bad_id else "\u00e9t\u00e9-\u03b1".encode()
    p = tmp_path / "ids.fa"
    p.write_bytes(
        head + b">" + weird + b" desc\n" + real[0][1].encode() + b"\n>plain_id\n" + real[1][1].encode() + b"\n"
    )
    m = ingest(
        input=str(p),
        output_dir=str(tmp_path / "o"),
        progress=False,
        fractions={"train": 1.0, "valid": 0.0, "test": 0.0},
    )
    with h5py.File(tmp_path / "o" / m["splits"]["train"]["shards"][0]["path"], "r") as f:
        ids = list(f["ids"].asstr()[:])
    assert ids[-2:] == ["\u00e9t\u00e9-\u03b1" if not bad_id else "\u00ff\u00feid", "plain_id"] and len(ids) == 12
