"""Bad inputs to ingest (the real CLI, in a subprocess) and to the shard reader / DataModule: each
is one clear line naming the file and what to do, exit code 1 without a traceback for the CLI, and
nothing that was there before is changed."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import pytest

from protein_performer.data.datamodule import DataSetupError, ProteinDataModule
from protein_performer.data.ingest import ingest
from protein_performer.data.shards import (
    IncompleteShardsError,
    MissingShardsError,
    MissingSplitError,
    ShardedDataset,
    ShardFormatError,
    VocabularyError,
)

ALL = {"train": 0.8, "valid": 0.1, "test": 0.1}


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to assert that nothing was changed)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(cwd: Path, *args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protein_performer.ingest", "progress=false", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn,
    )  # fmt: skip


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def small_fasta(tmp_path_factory, sample_fasta) -> Path:
    """400 real records, plain text."""
    text = gzip.decompress(sample_fasta.read_bytes()).decode()
    recs = text.split("\n>")[:400]
    p = tmp_path_factory.mktemp("bad_in") / "small.fasta"
    p.write_text("\n>".join(recs) + "\n")
    return p


@pytest.fixture()
def shards(tmp_path, small_fasta) -> Path:
    out = tmp_path / "shards"
    ingest(input=str(small_fasta), output_dir=str(out), progress=False, shard_size=100, fractions=ALL)
    return out


# ------------------------------------------------------------------------------- ingest CLI
def test_cli_directory_as_input_and_file_as_output_dir(tmp_path, small_fasta, shards):
    before = _snapshot(tmp_path)
    r = _cli(tmp_path, f"input={tmp_path}", "output_dir=o")
    _assert_one_line_error(r, str(tmp_path), "is a directory", "give a FASTA file")
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    before = _snapshot(tmp_path)
    r = _cli(tmp_path, f"input={small_fasta}", f"output_dir={f}")
    _assert_one_line_error(r, str(f), "is a file, not a directory")
    r = _cli(tmp_path, f"input={small_fasta}", f"output_dir={f}/sub")
    _assert_one_line_error(r, str(f), "is a file, not a directory")
    assert _snapshot(tmp_path) == before


def test_cli_fasta_with_only_invalid_records(tmp_path):
    """All records rejected: exit 1 with the counts and the rejects.tsv to read; no manifest and no
    shard (no reader takes the directory for a dataset), rejects.tsv written (what a user needs)."""
    p = tmp_path / "bad.fa"
    p.write_text(">a\nMK1V\n>b\n\n>c\nMKV@\n>d\nAC GT\nJ\n")
    out = tmp_path / "o"
    line = _assert_one_line_error(
        _cli(tmp_path, f"input={p}", f"output_dir={out}"), str(p), "no valid record: all 4 records were rejected",
        "3 invalid_character", "1 header_only", str(out / "rejects.tsv"),
    )  # fmt: skip
    assert "no shards were written" in line
    rows = (out / "rejects.tsv").read_text().splitlines()
    assert [r.split("\t")[2:4] for r in rows[1:]] == [
        ["a", "invalid_character"],
        ["b", "header_only"],
        ["c", "invalid_character"],
        ["d", "invalid_character"],
    ]
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.h5")) and not (out / "_work").exists()
    with pytest.raises(MissingShardsError, match="no manifest"):
        ShardedDataset(out, "train")


def test_cli_binary_and_other_compression_refused(tmp_path, small_fasta, shards):
    cases = {
        "shard.fa": (shards / "train/shard-00000.h5").read_bytes(),
        "seqs.fa.bz2": b"BZh91AY&SY" + os.urandom(64),
        "nul.fa": small_fasta.read_bytes()[:5000] + bytes(100) + small_fasta.read_bytes()[5000:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    before = _snapshot(tmp_path)
    for name, needle in (("shard.fa", "HDF5"), ("seqs.fa.bz2", "bzip2"), ("nul.fa", "NUL byte")):
        r = _cli(tmp_path, f"input={name}", f"output_dir=o_{name}")
        _assert_one_line_error(r, str(tmp_path / name), "binary content", needle)
        assert not (tmp_path / f"o_{name}" / "manifest.json").exists()
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("o_")} == before


def test_cli_resume_into_shards_of_another_format_version(tmp_path, small_fasta, shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["format_version"] = 0
    (shards / "manifest.json").write_text(json.dumps(m))
    before = _snapshot(shards)
    r = _cli(tmp_path, f"input={small_fasta}", f"output_dir={shards}", "shard_size=100",
             "fractions={train: 0.8, valid: 0.1, test: 0.1}", "resume=true")  # fmt: skip
    _assert_one_line_error(r, str(shards / "manifest.json"), "another format version", "without resume=true")
    assert _snapshot(shards) == before
    r = _cli(tmp_path, f"input={small_fasta}", f"output_dir={shards}", "min_length=30")  # another config
    _assert_one_line_error(r, str(shards), "different config", "overwrite=true")
    assert _snapshot(shards) == before


def _mount(*args: str) -> bool:
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(d: Path) -> None:
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_cli_output_dir_in_a_read_only_directory(tmp_path, small_fasta):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)):
        pytest.skip("cannot mount a read-only tmpfs here (not root, or no mount permission); chmod does not stop root")
    try:
        r = _cli(tmp_path, f"input={small_fasta}", f"output_dir={ro}/shards")
        _assert_one_line_error(r, str(ro), "permission denied", "writable path")
        assert list(ro.iterdir()) == []
    finally:
        _umount(ro)


def test_cli_disk_full_during_ingest_then_resume(tmp_path, small_fasta, sample_fasta):
    """A 2 MB tmpfs (or, where mounting is not allowed, a 1 MB file-size limit) fills during the
    ingest of the 3,000-record sample: one line saying no space / resume=true, exit 1; the complete
    ingest already on that disk is intact; the new one is refused by readers as incomplete and,
    with space again, resume=true finishes it with the same shards as an ingest elsewhere."""
    big = tmp_path / "sample.fasta"
    big.write_bytes(gzip.decompress(sample_fasta.read_bytes()))
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    limit = None
    if not mounted:  # Python ignores SIGXFSZ: writes past the limit fail with EFBIG
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))  # noqa: E731
    try:
        prev = disk / "prev"
        r = _cli(tmp_path, f"input={small_fasta}", f"output_dir={prev}")
        assert r.returncode == 0, r.stderr
        before = _snapshot(prev)
        new = disk / "new"
        args = (f"input={big}", f"output_dir={new}", "shard_size=500")
        r = _cli(tmp_path, *args, preexec_fn=limit)
        _assert_one_line_error(r, str(new), "no space left", "free space", "resume=true")
        assert _snapshot(prev) == before
        assert len(ShardedDataset(prev, "train")) > 0
        with pytest.raises(IncompleteShardsError, match="resume=true"):
            ShardedDataset(new, "train")
        if mounted:
            assert _mount("-o", "remount,size=64m", str(disk))
        r = _cli(tmp_path, *args, "resume=true")
        assert r.returncode == 0, r.stderr
        ref = tmp_path / "ref"
        assert _cli(tmp_path, f"input={big}", f"output_dir={ref}", "shard_size=500").returncode == 0
        assert _snapshot(new) == _snapshot(ref)
    finally:
        if mounted:
            _umount(disk)


# ------------------------------------------------------------------------------- shard reader / DataModule
def _flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_shard_names_the_file_and_says_reingest(shards, damage):
    shard = shards / "train/shard-00000.h5"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        _flip_middle(shard)
    before = _snapshot(shards)
    with pytest.raises(ShardFormatError) as e:
        ds = ShardedDataset(shards, "train")
        for i in range(len(ds)):  # a flipped chunk is found when it is read
            ds[i]
    msg = str(e.value)
    assert str(shard) in msg and "re-ingest" in msg and "\n" not in msg
    assert "truncated or corrupted" in msg
    with pytest.raises(ShardFormatError, match="shard-00000.h5"):
        dm = ProteinDataModule(str(shards), objective="uni", batch_size=4, num_workers=0)
        for _ in dm.train_dataloader():
            pass
    assert _snapshot(shards) == before


def test_other_format_version_and_vocabulary(shards):
    m = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**m, "format_version": 2}))
    with pytest.raises(ShardFormatError, match=r"format_version 2.*re-run ingestion"):
        ProteinDataModule(str(shards)).setup("fit")
    vocab = dict(m["vocab"])
    vocab["A"], vocab["C"] = vocab["C"], vocab["A"]
    (shards / "manifest.json").write_text(json.dumps({**m, "vocab": vocab}))
    with pytest.raises(
        VocabularyError, match=r"manifest.json: the shards were written with another token vocabulary.*re-ingest"
    ):
        ProteinDataModule(str(shards)).setup("fit")
    with pytest.raises(VocabularyError, match=r"shard-00000.h5: written with another token vocabulary"):
        ShardedDataset(shards, "train")  # the shards' own vocabulary is checked against the manifest
    (shards / "manifest.json").write_text(json.dumps(m))
    with h5py.File(shards / "valid/shard-00000.h5", "r+") as f:
        f.attrs["format_version"] = 7
    with pytest.raises(ShardFormatError, match=r"valid/shard-00000.h5: format_version 7.*re-ingest"):
        ShardedDataset(shards, "valid")


def test_missing_split_and_incomplete_or_wrong_directory(shards, tmp_path, caplog):
    m = json.loads((shards / "manifest.json").read_text())
    del m["splits"]["valid"]
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MissingSplitError) as e:
        ShardedDataset(shards, "valid")
    assert str(e.value).startswith(f"{shards / 'manifest.json'}: no split 'valid' (present: train, test)")
    assert isinstance(e.value, KeyError)  # (as before)
    dm = ProteinDataModule(str(shards), objective="uni", batch_size=4, eval_splits=["valid"])
    with caplog.at_level(logging.WARNING, logger="protein_performer.data.datamodule"):
        dm.setup("validate")  # trainer.validate on a store without valid: a warning that says what to do
    assert "nothing to validate on: no 'valid' split" in caplog.text and "data.eval_splits" in caplog.text
    with pytest.raises(DataSetupError, match=r"eval_splits: unknown split\(s\) \['validation'\]"):
        ProteinDataModule(str(shards), eval_splits=["validation"])
    with pytest.raises(MissingSplitError, match="no split 'valid'"):
        dm.residue_frequencies("valid")
    # a directory an ingest was still writing (killed): incomplete, resume
    (shards / "manifest.json").unlink()
    with pytest.raises(IncompleteShardsError, match=r"incomplete: .*rerun the same ingest command with resume=true"):
        ProteinDataModule(str(shards)).setup("fit")
    # a file given as the shard directory, and a directory that is no ingest output
    with pytest.raises(MissingShardsError, match="is a file; expected the output_dir of an ingest"):
        ShardedDataset(shards / "rejects.tsv", "train")
    empty = tmp_path / str(uuid.uuid4())
    empty.mkdir()
    with pytest.raises(MissingShardsError, match="no manifest at .*run `python -m protein_performer.ingest"):
        ShardedDataset(empty, "train")
