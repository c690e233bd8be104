"""Ingestion on real data: round trip, counts vs SimpleFastaParser, dedup, splits, OOD, length
filter, workers / part+merge == one run, resume == uninterrupted, output-dir safety, Hydra entry."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.data.ingest import (
    IngestConfig,
    IngestError,
    SimulatedInterruption,
    ingest,
    merge,
    parse_header,
    resolve_config,
    split_codes,
)
from protein_performer.data.ingest.config import WorkUnit
from protein_performer.data.ingest.hashing import mix64
from protein_performer.data.ingest.resolve import first_occurrence
from protein_performer.data.tokenizer import Tokenizer

TOK = Tokenizer()
SPLITS = ("train", "valid", "test", "ood")


def sfp(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        return list(SimpleFastaParser(fh))


def acc_of(header: str) -> str:
    w = header.split()[0]
    return w.split("|")[1] if w[:3] in ("sp|", "tr|") else w


def read_back(out: Path) -> dict[str, list[tuple[str, bytes]]]:
    """split -> [(id, token bytes)] in manifest order, read with h5py directly."""
    m = json.loads((out / "manifest.json").read_text())
    got = {}
    for split in SPLITS:
        rows = []
        for sh in m["splits"][split]["shards"]:
            with h5py.File(out / sh["path"], "r") as f:
                tok, off = f["tokens"][:], f["offsets"][:]
                ids = [i.decode() if isinstance(i, bytes) else i for i in f["ids"][:]]
                assert f["tokens"].compression == "gzip" and f["tokens"].chunks is not None
                assert f.attrs["split"] == split and int(f.attrs["format_version"]) == 1
                assert json.loads(f.attrs["vocab"]) == TOK.vocab()
                assert len(ids) == sh["n_sequences"] and off[-1] == sh["n_residues"] == tok.size
            rows += [(ids[i], tok[off[i] : off[i + 1]].tobytes()) for i in range(len(ids))]
        got[split] = rows
    return got


def enc(seq: str) -> bytes:
    return TOK.encode(seq).tobytes()


@pytest.fixture(scope="module")
def plain_sample(sample_fasta, tmp_path_factory):
    p = tmp_path_factory.mktemp("plain") / "uniprot_sample.fasta"
    p.write_bytes(gzip.decompress(sample_fasta.read_bytes()))
    return p


@pytest.fixture(scope="module")
def single(sample_fasta, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "shards"
    m = ingest(input=str(sample_fasta), output_dir=str(out), progress=False, shard_size=1000)
    return out, m, read_back(out)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_and_counts_vs_simplefastaparser(sample_fasta, single):
    out, m, got = single
    ref = sfp(sample_fasta)
    assert m["n_records"] == len(ref) == 3000
    # expected: first occurrence of each (upper-cased) sequence, in input order
    seen, expect = set(), []
    for h, s in ref:
        t = enc(s)
        if t not in seen:
            seen.add(t)
            expect.append((acc_of(h), t))
    assert m["n_unique"] == len(expect)
    assert m["n_duplicates"] == len(ref) - len(expect) > 0
    assert m["rejected"] == {}
    flat = [r for split in SPLITS for r in got[split]]
    assert sorted(flat) == sorted(expect)
    # within a split, input order is kept
    pos = {r: i for i, r in enumerate(expect)}
    for split in SPLITS:
        idx = [pos[r] for r in got[split]]
        assert idx == sorted(idx)


def test_manifest_schema_and_statistics(sample_fasta, single):
    out, m, got = single
    for k in (
        "format_version",
        "vocab",
        "config",
        "sources",
        "splits",
        "n_records",
        "n_unique",
        "n_duplicates",
        "rejected",
        "rejects_file",
        "length_filter",
        "ood_families",
    ):
        assert k in m
    import hashlib

    src = m["sources"][0]
    assert src["sha256"] == hashlib.sha256(sample_fasta.read_bytes()).hexdigest()
    assert src["bytes"] == sample_fasta.stat().st_size
    assert m["length_filter"] == {"min": None, "max": None}
    assert (out / "rejects.tsv").read_text().splitlines() == ["file\tline\tid\treason\tdetail"]
    assert not (out / "_work").exists()
    for split in ("train", "valid", "test"):
        s = m["splits"][split]
        lens = np.array([len(t) for _, t in got[split]])
        assert s["n_sequences"] == lens.size and s["n_residues"] == lens.sum()
        assert s["length"]["min"] == lens.min() and s["length"]["max"] == lens.max()
        assert s["length"]["mean"] == pytest.approx(lens.mean(), rel=1e-12)
        assert s["length"]["median"] == np.median(lens)
    assert len(m["splits"]["train"]["shards"]) == 3  # 2,9xx sequences in shards of 1,000
    assert m["splits"]["ood"]["n_sequences"] == 0  # UniProt sample holds none of the paper's families


def test_headers_case_stop_and_crlf_in_ingest(sample_fasta, tmp_path):
    ref = sfp(sample_fasta)[:200]
    lines = []
    for i, (h, s) in enumerate(ref):
        acc = acc_of(h)
        head = [h, f"UniRef50_{acc} Cluster: x n=2", f"{acc}.3 plain header"][i % 3]
        body = "\r\n".join(s[j : j + 50].lower() for j in range(0, len(s), 50))
        lines.append(f">{head}\r\n{body}*\r\n")
    p = tmp_path / "mixed.fa"
    p.write_text("".join(lines))
    m = ingest(input=str(p), output_dir=str(tmp_path / "o"), progress=False)
    got = read_back(tmp_path / "o")
    want_ids = [[acc_of(h), f"UniRef50_{acc_of(h)}", f"{acc_of(h)}.3"][i % 3] for i, (h, _) in enumerate(ref)]
    seen, expect = set(), []
    for rid, (_, s) in zip(want_ids, ref):
        if enc(s) not in seen:
            seen.add(enc(s))
            expect.append((rid, enc(s)))
    assert sorted(r for split in SPLITS for r in got[split]) == sorted(expect)
    assert m["rejected"] == {}


def test_parse_header():
    assert parse_header(b"sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens") == (b"P69905", b"P69905")
    assert parse_header(b"tr|A0A024R161|A0A024R161_HUMAN Guanine") == (b"A0A024R161", b"A0A024R161")
    assert parse_header(b"UniRef50_Q6GZX4 Putative transcription factor 001R n=2") == (b"UniRef50_Q6GZX4", b"Q6GZX4")
    assert parse_header(b"FUBP2_HUMAN/426-491 PF00013") == (b"FUBP2_HUMAN/426-491", b"FUBP2_HUMAN/426-491")
    assert parse_header(b"A0A317\tGO=GO:0003735") == (b"A0A317", b"A0A317")
    assert parse_header(b"") == (b"", b"")


def test_output_reads_through_the_shard_reader(single):
    """Contract with protein_performer.data.shards (the DataModule's reader)."""
    from protein_performer.data.shards import ShardedDataset

    out, m, got = single
    for split in ("train", "valid", "test"):
        ds = ShardedDataset(out, split)
        assert len(ds) == m["splits"][split]["n_sequences"] == len(got[split])
        for i in range(0, len(ds), max(1, len(ds) // 25)):
            assert (ds.get_id(i), ds[i].tobytes()) == got[split][i]


# ----------------------------------------------------------------------------- splits
def test_split_hash_matches_pure_python_reference():
    M = (1 << 64) - 1

    def mix(x):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & M
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & M
        return x ^ (x >> 31)

    rng = np.random.default_rng(7)
    h = rng.integers(0, 2**63, size=2000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    for seed in (0, 12345):
        salt = mix((seed + 0x9E3779B97F4A7C15) & M)
        fr = {"train": 0.5, "valid": 0.3, "test": 0.2}
        codes = split_codes(h, seed, fr)
        for x, c in zip(h.tolist(), codes.tolist()):
            u = (mix(x ^ salt) >> 11) / 2**53
            assert c == (0 if u < 0.5 else 1 if u < 0.8 else 2)
        assert int(mix64(np.array([x], np.uint64))[0]) == mix(x)
    # fractions are honoured within 5 binomial standard deviations
    n = h.size
    for code, p in enumerate((0.5, 0.3, 0.2)):
        k = int((codes == code).sum())
        assert abs(k - p * n) < 5 * np.sqrt(n * p * (1 - p))


def test_first_occurrence_matches_brute_force():
    # small key space: many equal keys and many keys sharing their first 64 bits
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 300))
        key = rng.integers(0, 4, size=(n, 2)).astype(np.uint64)
        if _ % 3 == 2:  # equal first halves only for equal keys: the path without the lexsort
            key[:, 1] = key[:, 0] * np.uint64(7)
        gidx = np.arange(n) * 3 + 5
        if _ % 2:  # entries need not come in gidx order
            gidx = rng.permutation(gidx)
        order, is_first, first_pos, starts = first_occurrence(key, gidx)
        ref = {}
        for i in np.argsort(gidx):
            ref.setdefault(tuple(key[i]), gidx[i])
        assert sorted(gidx[order][is_first].tolist()) == sorted(ref.values())
        assert [gidx[order][first_pos[j]] for j in range(n)] == [ref[tuple(key[order[j]])] for j in range(n)]
        assert len(starts) == len(ref)


def test_split_stability_and_seed(sample_fasta, single, tmp_path):
    _, _, got = single
    split_of = {t: s for s in SPLITS for _, t in got[s]}
    # other shard size and block size: same assignment
    out2 = tmp_path / "b"
    ingest(input=str(sample_fasta), output_dir=str(out2), progress=False, shard_size=50, block_size=3000)
    got2 = read_back(out2)
    assert {t: s for s in SPLITS for _, t in got2[s]} == split_of
    # another seed and fractions 0.6/0.2/0.2: a different but well-proportioned split
    out3 = tmp_path / "c"
    m3 = ingest(
        input=str(sample_fasta),
        output_dir=str(out3),
        progress=False,
        seed=1,
        fractions={"train": 0.6, "valid": 0.2, "test": 0.2},
    )
    got3 = read_back(out3)
    n = m3["n_unique"]
    for s, p in (("train", 0.6), ("valid", 0.2), ("test", 0.2)):
        assert abs(len(got3[s]) - p * n) < 5 * np.sqrt(n * p * (1 - p))
    moved = sum(split_of[t] != s for s in SPLITS for _, t in got3[s])
    assert moved > 0.3 * n


# ----------------------------------------------------------------------------- OOD
def _swissprot_ood_expectation(repo_root, families):
    hits = [ln.split("\t") for ln in (repo_root / "data/swissprot_sample.pfam_hits.tsv").read_text().splitlines()[1:]]
    return hits, {h[0] for h in hits if h[1] in families or h[2].split(".")[0] in families}


@pytest.mark.parametrize("layout", ["hits", "two_column", "pfam_regions"])
def test_ood_from_annotation_tsv(repo_root, tmp_path, layout):
    fasta = repo_root / "data/swissprot_sample.fasta.gz"
    hits, ood_accs = _swissprot_ood_expectation(repo_root, {"RRM_1", "PF00076", "globins4"})
    ann = repo_root / "data/swissprot_sample.pfam_hits.tsv"
    families = ["RRM_1", "globins4"]
    if layout == "two_column":  # accession<TAB>family name, no header
        ann = tmp_path / "two.tsv"
        ann.write_text("".join(f"{h[0]}\t{h[1]}\n" for h in hits))
    elif layout == "pfam_regions":  # Pfam-A.regions.uniprot.tsv columns; globins4 has no PF accession
        ann = tmp_path / "Pfam-A.regions.uniprot.tsv.gz"
        rows = "pfamseq_acc\tseq_version\tcrc64\tmd5\tpfamA_acc\tseq_start\tseq_end\n" + "".join(
            f"{h[0]}\t1\t0\t0\t{h[2]}\t1\t100\n" for h in hits if h[2] != "-"
        )
        ann.write_bytes(gzip.compress(rows.encode()))
        families = ["PF00076.13"]
        ood_accs = {h[0] for h in hits if h[2].startswith("PF00076")}
    out = tmp_path / "o"
    m = ingest(input=str(fasta), output_dir=str(out), progress=False, annotations=str(ann), ood_families=families)
    got = read_back(out)
    ood_ids = {i for i, _ in got["ood"]}
    ref = sfp(fasta)
    kept_ood = set()
    seen = {}
    for h, s in ref:  # a sequence is ood when any of its records is
        seen.setdefault(enc(s), []).append(h.split()[0])
    for accs in seen.values():
        if any(a in ood_accs for a in accs):
            kept_ood.add(accs[0])
    assert ood_ids == kept_ood and len(ood_ids) > 100
    for s in ("train", "valid", "test"):
        assert not {i for i, _ in got[s]} & ood_accs
    assert m["ood_families"] == [f.split(".")[0] if f.startswith("PF") else f for f in families]


def test_ood_from_header_family_token(shared_data, tmp_path):
    recs = []
    with gzip.open(shared_data / "pfam40_domains.fasta.gz", "rt") as fh:
        for i, (h, s) in enumerate(SimpleFastaParser(fh)):
            if i % 20 == 0:
                recs.append((h, s))
            if len(recs) == 2000:
                break
    p = tmp_path / "pfam40_subset.fa"
    p.write_text("".join(f">{h}\n{s}\n" for h, s in recs))
    fams = sorted({h.split()[1] for h, _ in recs})[:3]
    m = ingest(input=str(p), output_dir=str(tmp_path / "o"), progress=False, ood_families=fams)
    got = read_back(tmp_path / "o")
    want, seen = set(), {}
    for h, s in recs:
        seen.setdefault(enc(s.replace("-", "").replace(".", "")), []).append(h)
    for hs in seen.values():
        if any(h.split()[1] in fams for h in hs):
            want.add(hs[0].split()[0])
    assert {i for i, _ in got["ood"]} == want and m["splits"]["ood"]["n_sequences"] == len(want) > 0


def test_family_tokens_are_found_in_the_right_headers():
    from protein_performer.data.ingest.annotations import records_with_family_token

    headers = [b"sp|P1|A x", b"tr|Q2|B PF00013 PF12345.7", b"", b"PF00013", b"x PF0001", b"UniRef50_Q3 PF99999"]
    assert records_with_family_token(headers, {b"PF00013"}) == [1, 3]
    assert records_with_family_token(headers, {b"PF12345", b"PF99999"}) == [1, 5]
    assert records_with_family_token(headers, {b"PF00001"}) == []  # 'PF0001' is no 5-digit token
    assert records_with_family_token([b"no family"], {b"PF00013"}) == []


# ----------------------------------------------------------------------------- length filter
def test_length_filter(sample_fasta, tmp_path):
    out = tmp_path / "o"
    m = ingest(input=str(sample_fasta), output_dir=str(out), progress=False, min_length=100, max_length=800)
    ref = sfp(sample_fasta)
    lens = np.array([len(s) for _, s in ref])
    assert m["rejected"] == {"too_short": int((lens < 100).sum()), "too_long": int((lens > 800).sum())}
    assert m["length_filter"] == {"min": 100, "max": 800}
    got = read_back(out)
    all_lens = [len(t) for s in SPLITS for _, t in got[s]]
    assert min(all_lens) >= 100 and max(all_lens) <= 800
    rows = (out / "rejects.tsv").read_text().splitlines()[1:]
    assert len(rows) == sum(m["rejected"].values())
    assert all(r.split("\t")[3] in ("too_short", "too_long") for r in rows)


# ----------------------------------------------------------------------------- id keys, compression
def test_id_keys_are_equal_exactly_for_equal_ids():
    """The idh field: short ids packed as themselves, long ones hashed; never equal for two ids."""
    from protein_performer.data.ingest.hashing import id_keys

    ids = [b"", b"A", b"A\x00", b"P12345", b"P12345.2", b"A" * 15, b"A" * 16, b"A" * 17, b"B" * 15 + b"\x0f",
           b"UniRef100_A0A023GPI8", b"UniRef100_A0A023GPI9", "\u00e9t\u00e9".encode(), b"A" * 14 + b"\x0f"]  # fmt: skip
    ids = ids + ids[::-1]  # every id twice
    keys = id_keys(ids, np.array([len(i) for i in ids]))
    assert keys.dtype == np.uint64 and keys.shape == (len(ids), 2)
    rows = {}
    for i, k in zip(ids, map(tuple, keys.tolist())):
        assert rows.setdefault(k, i) == i  # a key never stands for two different ids
    assert len(rows) == len(set(ids))
    # an id's key does not depend on the rest of its batch (batches of only short or only long ids)
    for i, k in zip(ids, keys.tolist()):
        assert id_keys([i], np.array([len(i)])).tolist() == [k]
    long_ids = [i for i in ids if len(i) > 15]
    assert id_keys(long_ids, np.array([len(i) for i in long_ids])).tolist() == [
        k for i, k in zip(ids, keys.tolist()) if len(i) > 15
    ]


@pytest.fixture(scope="module")
def real_records(sample_fasta):
    return sfp(sample_fasta)[:10]


def test_duplicate_id_conflict_with_long_ids(real_records, tmp_path):
    """Ids longer than 15 bytes take the hashed path of the id keys; conflicts are still found and
    ids sharing a 15-byte prefix are still different ids."""
    (_, a), (_, b), (_, c) = real_records[:3]
    long1, long2 = "UniRef100_A0A023GPI8", "UniRef100_A0A023GPI9"
    text = f">{long1}\n{a}\n>{long2}\n{b}\n>{long1[:15]}\n{c}\n>{long1} again\n{c}\n>{long2}\n{b}\n"
    p = tmp_path / "long_ids.fa"
    p.write_text(text)
    m = ingest(input=str(p), output_dir=str(tmp_path / "o"), progress=False)
    assert m["rejected"] == {"duplicate_id_conflict": 1} and m["n_duplicates"] == 1 and m["n_unique"] == 3
    row = (tmp_path / "o" / "rejects.tsv").read_text().splitlines()[1].split("\t")
    assert row[1:4] == ["7", long1, "duplicate_id_conflict"]


def test_gzip_strategies_give_the_same_content(sample_fasta, single, tmp_path):
    """gzip_strategy=default (HDF5's deflate filter) vs huffman_only (chunks deflated by the writer,
    the default): the same shards' content; both read by h5py as gzip (checked in read_back)."""
    _, m1, got1 = single
    out = tmp_path / "default"
    m = ingest(input=str(sample_fasta), output_dir=str(out), progress=False, shard_size=1000, gzip_strategy="default")
    assert read_back(out) == got1 and m["config"]["gzip_strategy"] == "default"
    assert m1["config"]["gzip_strategy"] == "huffman_only"
    with pytest.raises(IngestError, match="gzip_strategy must be one of"):
        ingest(input=str(sample_fasta), output_dir=str(tmp_path / "x"), gzip_strategy="rle")


# ----------------------------------------------------------------------------- parallel / parts
def _same_as_single(out: Path, single_got, single_m):
    m = json.loads((out / "manifest.json").read_text())
    got = read_back(out)
    assert got == single_got
    for k in ("n_records", "n_unique", "n_duplicates", "rejected"):
        assert m[k] == single_m[k]
    for s in SPLITS:
        a, b = m["splits"][s], single_m["splits"][s]
        assert (a["n_sequences"], a["n_residues"], a["length"]) == (b["n_sequences"], b["n_residues"], b["length"])
    return m


@pytest.fixture(scope="module")
def dup_heavy(plain_sample, tmp_path_factory):
    """The sample followed by 300 of its own records: every range sees duplicates of earlier ones,
    and 5 ids recur with another sequence (duplicate_id_conflict across ranges)."""
    recs = sfp(plain_sample)
    extra = recs[::10][:300]
    conflicts = [(h, s[::-1]) for h, s in recs[1:50:10]]
    p = tmp_path_factory.mktemp("dup") / "dup.fasta"
    p.write_text("".join(f">{h}\n{s}\n" for h, s in recs + extra + conflicts))
    out = tmp_path_factory.mktemp("dup_single") / "o"
    m = ingest(input=str(p), output_dir=str(out), progress=False, shard_size=700)
    assert m["rejected"] == {"duplicate_id_conflict": 5}
    assert m["n_duplicates"] >= 336
    return p, m, read_back(out), (out / "rejects.tsv").read_text()


def test_bucketed_and_windowed_merge_equals_default(dup_heavy, tmp_path, monkeypatch):
    """The bounded-memory paths: dedup in several hash buckets, records read in small windows."""
    from protein_performer.data.ingest import resolve, write

    p, m1, got1, rejects1 = dup_heavy
    for stage in (resolve, write):  # the stages that read records in windows
        monkeypatch.setattr(stage, "WINDOW", 333)
    out = tmp_path / "b"
    ingest(input=str(p), output_dir=str(out), progress=False, shard_size=700, merge_memory_mb=0.03)
    _same_as_single(out, got1, m1)
    assert (out / "rejects.tsv").read_text() == rejects1
    assert [sh["n_sequences"] for sh in m1["splits"]["train"]["shards"]][:-1] == [700] * 4


@pytest.mark.slow
def test_two_workers_equal_single_run(dup_heavy, tmp_path):
    p, m1, got1, rejects1 = dup_heavy
    out = tmp_path / "w2"
    m = ingest(input=str(p), output_dir=str(out), progress=False, shard_size=700, workers=2)
    _same_as_single(out, got1, m1)
    assert any("part-0001" in sh["path"] for sh in m["splits"]["train"]["shards"])
    assert (out / "rejects.tsv").read_text() == rejects1


def test_parts_and_merge_equal_single_run(dup_heavy, tmp_path):
    p, m1, got1, rejects1 = dup_heavy
    out = tmp_path / "parts"
    for i in (2, 0, 1):  # any order
        r = ingest(input=str(p), output_dir=str(out), progress=False, shard_size=700, part=i, num_parts=3)
        assert r["unit"] == i
    assert not (out / "manifest.json").exists()
    ingest(merge=True, output_dir=str(out), progress=False)
    _same_as_single(out, got1, m1)
    assert (out / "rejects.tsv").read_text() == rejects1
    # the rejects (id conflicts) carry the same absolute line numbers as in the single run
    single_rows = [r for r in (out / "rejects.tsv").read_text().splitlines()]
    assert len(single_rows) == 6
    data = p.read_text().splitlines()
    for row in single_rows[1:]:
        f, line, rid, reason, _ = row.split("\t")
        assert reason == "duplicate_id_conflict"
        assert data[int(line) - 1].startswith(">") and acc_of(data[int(line) - 1][1:]) == rid


@pytest.mark.slow
def test_hydra_multirun_parts_then_merge_equal_single_run(plain_sample, single, tmp_path):
    _, m1, got1 = single
    py = [sys.executable, "-m", "protein_performer.ingest"]
    r = subprocess.run(
        py
        + [
            "-m",
            "part=range(0,3)",
            "num_parts=3",
            f"input={plain_sample}",
            "output_dir=out",
            "progress=false",
            "shard_size=1000",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        py + ["merge=true", "output_dir=out", "workers=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert read_back(tmp_path / "out") == got1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the multirun logs stay inside out/_slurm


def test_merge_before_all_parts_is_refused(dup_heavy, tmp_path):
    p = dup_heavy[0]
    out = tmp_path / "parts"
    ingest(input=str(p), output_dir=str(out), progress=False, part=0, num_parts=2)
    with pytest.raises(IngestError, match=r"parts \[1\] of 2 have not finished"):
        merge(out, progress=False)


def test_parts_one_gz_file_each_equal_single_run(sample_fasta, single, tmp_path):
    _, m1, got1 = single
    text = gzip.decompress(sample_fasta.read_bytes())
    cut = [0]
    for frac in (0.3, 0.7):  # cut at record starts
        cut.append(text.index(b"\n>", int(len(text) * frac)) + 1)
    cut.append(len(text))
    files = []
    for i in range(3):
        f = tmp_path / f"chunk{i}.fa.gz"
        f.write_bytes(gzip.compress(text[cut[i] : cut[i + 1]]))
        files.append(str(f))
    out = tmp_path / "o"
    for i in range(3):
        ingest(input=files, output_dir=str(out), progress=False, shard_size=1000, part=i, num_parts=3)
    m = merge(out, progress=False)
    got = read_back(out)
    assert got == got1
    assert m["n_unique"] == m1["n_unique"] and len(m["sources"]) == 3


def test_byte_ranges_of_gz_are_refused_with_advice(sample_fasta, tmp_path):
    with pytest.raises(IngestError, match=r"gzip-compressed.*uncompressed.*one per part"):
        ingest(input=str(sample_fasta), output_dir=str(tmp_path / "o"), part=0, num_parts=4, progress=False)


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("compressed", [False, True])
def test_resume_after_crash_in_parsing_equals_uninterrupted(plain_sample, sample_fasta, single, tmp_path, compressed):
    _, m1, got1 = single
    out = tmp_path / "o"
    src = sample_fasta if compressed else plain_sample  # a gzip stream is resumed by skipping ahead
    kw = dict(input=str(src), output_dir=str(out), progress=False, shard_size=1000, block_size=50_000)
    with pytest.raises(SimulatedInterruption):
        ingest(**kw, fail_after_records=1500)
    assert not (out / "manifest.json").exists() and not list(out.glob("*/*.h5"))
    ckpt = json.loads((out / "_work/unit-0000/checkpoint.json").read_text())
    assert 0 < ckpt["n_records"] < 1500  # the crash came after the last checkpoint
    m = ingest(**kw, resume=True)
    assert read_back(out) == got1
    assert m["n_unique"] == m1["n_unique"] and m["n_records"] == 3000


def test_resume_after_crash_in_shard_writing_equals_uninterrupted(sample_fasta, single, tmp_path):
    _, m1, got1 = single
    out = tmp_path / "o"
    kw = dict(input=str(sample_fasta), output_dir=str(out), progress=False, shard_size=1000)
    with pytest.raises(SimulatedInterruption):
        ingest(**kw, fail_after_shards=2)
    assert len(list(out.glob("*/*.h5"))) == 2 and not (out / "manifest.json").exists()
    assert not list(out.glob("*/.*.partial"))  # no partial shard is visible
    ingest(**kw, resume=True)
    assert read_back(out) == got1


# ----------------------------------------------------------------------------- output dir safety
def test_other_config_refused_unless_overwrite(sample_fasta, tmp_path):
    out = tmp_path / "o"
    ingest(input=str(sample_fasta), output_dir=str(out), progress=False, min_length=50)
    with pytest.raises(IngestError, match="different config.*min_length.*overwrite=true"):
        ingest(input=str(sample_fasta), output_dir=str(out), progress=False, min_length=60)
    m = ingest(input=str(sample_fasta), output_dir=str(out), progress=False, min_length=60, overwrite=True)
    assert m["length_filter"]["min"] == 60
    stranger = tmp_path / "s"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(IngestError, match="not empty"):
        ingest(input=str(sample_fasta), output_dir=str(stranger), progress=False)


def test_config_is_resolved_once_into_a_frozen_dataclass(sample_fasta, repo_root, tmp_path):
    """resolve_config: one IngestConfig field per key of conf/ingest.yaml (plus the work units),
    paths absolute, families normalised; frozen; bad options refused with the same messages."""
    import dataclasses

    import yaml

    keys = set(yaml.safe_load((repo_root / "conf" / "ingest.yaml").read_text())) - {"hydra", "defaults"}
    assert {f.name for f in dataclasses.fields(IngestConfig)} == keys | {"units"}
    cfg = resolve_config({"input": str(sample_fasta), "ood_families": ["PF00013.2", "RRM_1"]}, output_dir="rel")
    assert isinstance(cfg, IngestConfig) and cfg.input == [str(sample_fasta.absolute())]
    assert cfg.output_dir == str(Path("rel").absolute()) and cfg.ood_families == ["PF00013", "RRM_1"]
    assert cfg.units == [WorkUnit(file=0, start=0, end=None)] and cfg.annotations == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 2
    with pytest.raises(IngestError, match="unknown ingest option 'shards'; known options: annotations, "):
        resolve_config(input=str(sample_fasta), output_dir=str(tmp_path), shards=3)
    with pytest.raises(IngestError, match=r"fractions must give train, valid, test >= 0 summing to 1"):
        resolve_config(
            input=str(sample_fasta), output_dir=str(tmp_path), fractions={"train": 0.5, "valid": 0.1, "test": 0.1}
        )
    with pytest.raises(IngestError, match="min_length 9 > max_length 3"):
        resolve_config(input=str(sample_fasta), output_dir=str(tmp_path), min_length=9, max_length=3)
    merging = resolve_config(output_dir=str(tmp_path), merge=True)  # the rest comes from ingest_config.json
    assert merging.merge and merging.input is None and merging.units == []


# ----------------------------------------------------------------------------- entry point
def test_hydra_entry_point_relative_paths_and_no_litter(repo_root, tmp_path):
    src = repo_root / "data/swissprot_sample.fasta.gz"
    (tmp_path / "in.fa.gz").write_bytes(src.read_bytes())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "protein_performer.ingest",
            "input=in.fa.gz",
            "output_dir=out",
            "progress=false",
            "annotations=" + str(repo_root / "data/swissprot_sample.pfam_hits.tsv"),
            "ood_families=[RRM_1]",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "records 1,000" in r.stdout and "ood" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa.gz", "out"]
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert m["n_records"] == 1000 and m["splits"]["ood"]["n_sequences"] > 50
    bad = subprocess.run(
        [sys.executable, "-m", "protein_performer.ingest", "input=missing.fa", "output_dir=out2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "input file not found" in bad.stderr + bad.stdout


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")
def test_slurm_launcher_config_composes(repo_root):
    # conf/hydra/launcher/submitit_slurm.yaml shadows the plugin's node of the same name; Hydra
    # validates it against the plugin's schema (and warns that this matching is deprecated)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(repo_root / "conf"), version_base="1.3"):
        cfg = compose(
            "ingest",
            overrides=[
                "hydra/launcher=submitit_slurm",
                "hydra.launcher.partition=cpu",
                "part=3",
                "num_parts=16",
                "input=x.fa",
                "output_dir=o",
            ],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "cpu" and cfg.hydra.launcher.tasks_per_node == 1
    assert cfg.part == 3 and cfg.num_parts == 16


def _sleep_then_time(seconds):
    time.sleep(seconds)
    return time.time()


def _unit_job_stub(args):
    return args[0], len(args[1]), time.time()


def test_workers_do_not_block_on_a_busy_worker(monkeypatch):
    """Workers: a deferred job runs on the worker right after its last job; a large message to a
    busy worker (a big unit's final codes) does not hold up the caller's own job; results come
    back in job order."""
    import protein_performer.data.ingest as ing

    monkeypatch.setattr(ing.workers, "_unit_job", _unit_job_stub)
    pool = ing.workers.Workers(2, 2)
    try:
        slept = pool.defer(_sleep_then_time, 0.5)
        assert [r[:2] for r in pool.map([("a", b""), ("b", b"")])] == [("a", 0), ("b", 0)]
        big = np.zeros(8 << 20, np.uint8)  # far more than a pipe buffer
        main, other = pool.map([("main", big), ("worker", big)])
        assert main[:2] == ("main", big.size) and other[:2] == ("worker", big.size)
        assert main[2] < slept() <= other[2]  # the caller ran its job while the worker still slept
        pool.stop()
    finally:
        pool.close()
