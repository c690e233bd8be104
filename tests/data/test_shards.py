"""The HDF5 shard writer and the random-access reader, on real UniProt sequences.

``make_store`` (also used by test_collate.py and test_datamodule.py) writes a shard store with a
manifest from the shipped sample, independently of the ingestion code.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protein_performer.data.shards import (
    FORMAT_VERSION,
    PackedDataset,
    ShardedDataset,
    ShardFormatError,
    read_manifest,
    write_shard,
)
from protein_performer.data.tokenizer import Tokenizer

TOK = Tokenizer()
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "uniprot_sample.fasta.gz"


def load_records(limit: int | None = None, path: Path = SAMPLE) -> list[tuple[str, np.ndarray]]:
    """(accession, tokens) of the sample's records, in file order, parsed by Biopython."""
    out = []
    with gzip.open(path, "rt") as fh:
        for header, seq in SimpleFastaParser(fh):
            word = header.split()[0]
            acc = word.split("|")[1] if word.count("|") >= 2 else word
            out.append((acc, TOK.encode(seq)))
            if limit is not None and len(out) >= limit:
                break
    return out


def make_store(
    root: Path,
    splits: dict[str, list[tuple[str, np.ndarray]]],
    per_shard: int = 50,
    chunk_size: int = 4096,
) -> Path:
    """Write ``splits`` (name -> records) as shards of ``per_shard`` sequences plus manifest.json."""
    root = Path(root)
    manifest = {"format_version": FORMAT_VERSION, "vocab": TOK.vocab(), "config": {}, "sources": [], "splits": {}}
    for split, records in splits.items():
        shards = []
        for k, start in enumerate(range(0, len(records), per_shard)):
            part = records[start : start + per_shard]
            lengths = np.array([t.size for _, t in part], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            tokens = np.concatenate([t for _, t in part]).astype(np.uint8)
            rel = f"{split}/shard-{k:05d}.h5"
            write_shard(root / rel, tokens, offsets, [a for a, _ in part], split, TOK.vocab(), chunk_size=chunk_size)
            shards.append({"path": rel, "n_sequences": len(part), "n_residues": int(tokens.size)})
        lengths = [t.size for _, t in records]
        manifest["splits"][split] = {
            "n_sequences": len(records),
            "n_residues": int(sum(lengths)),
            "length": {"min": min(lengths, default=0), "max": max(lengths, default=0)},
            "shards": shards,
        }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def records():
    return load_records(400)


@pytest.fixture()
def store(tmp_path, records):
    # uneven shard sizes on purpose: 400 = 7 * 53 + 29
    return make_store(tmp_path / "store", {"train": records[:371], "valid": records[371:]}, per_shard=53)


def test_write_shard_layout(tmp_path, records):
    part = records[:10]
    tokens = np.concatenate([t for _, t in part])
    offsets = np.concatenate([[0], np.cumsum([t.size for _, t in part])])
    path = write_shard(
        tmp_path / "a" / "shard-00000.h5", tokens, offsets, [a for a, _ in part], "train", TOK.vocab(), chunk_size=1000
    )
    assert sorted(os.listdir(tmp_path / "a")) == ["shard-00000.h5"]  # no temporary left
    with h5py.File(path, "r") as f:
        assert f["tokens"].dtype == np.uint8 and f["tokens"].chunks == (1000,)
        assert f["tokens"].compression == "gzip"
        assert np.array_equal(f["tokens"][:], tokens)
        assert f["offsets"].dtype == np.int64 and np.array_equal(f["offsets"][:], offsets)
        assert list(f["ids"].asstr()[:]) == [a for a, _ in part]
        assert json.loads(f.attrs["vocab"]) == TOK.vocab()
        assert f.attrs["split"] == "train" and int(f.attrs["format_version"]) == FORMAT_VERSION


def test_write_shard_lzf_and_empty(tmp_path):
    p = write_shard(tmp_path / "e.h5", np.zeros(0, np.uint8), np.zeros(1, np.int64), [], "test", TOK.vocab())
    with h5py.File(p, "r") as f:
        assert f["tokens"].shape == (0,) and f["ids"].shape == (0,)
    t = TOK.encode("MKV" * 100)
    p = write_shard(tmp_path / "l.h5", t, [0, 300], ["x"], "ood", TOK.vocab(), compression="lzf")
    with h5py.File(p, "r") as f:
        assert f["tokens"].compression == "lzf" and np.array_equal(f["tokens"][:], t)


@pytest.mark.parametrize(
    "n_tokens", [3 * 1000, 3 * 1000 + 417, 999, 1]
)  # whole chunks, a partial last chunk, one short chunk
def test_huffman_only_chunks_are_standard_gzip_and_read_back_identical(tmp_path, records, n_tokens):
    """gzip_strategy="huffman_only" deflates the chunks itself (write_direct_chunk): h5py must see an
    ordinary gzip-filtered dataset, every chunk a zlib stream of exactly one chunk (the last one
    zero-padded, as HDF5 pads edge chunks), and the data must read back byte-identical."""
    tokens = np.concatenate([t for _, t in records])[:n_tokens]
    offsets = np.array([0, n_tokens // 2, n_tokens], dtype=np.int64)
    kw = dict(chunk_size=1000, compression="gzip", compression_opts=1)
    a = write_shard(
        tmp_path / "huff.h5", tokens, offsets, ["x", "y"], "train", TOK.vocab(), gzip_strategy="huffman_only", **kw
    )
    b = write_shard(tmp_path / "hdf5.h5", tokens, offsets, ["x", "y"], "train", TOK.vocab(), **kw)
    chunk = min(1000, n_tokens)
    with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
        d = f["tokens"]
        assert d.compression == "gzip" and d.chunks == (chunk,) and d.dtype == np.uint8
        assert np.array_equal(d[:], tokens) and np.array_equal(d[:], g["tokens"][:])
        assert np.array_equal(d[n_tokens - 7 :], tokens[-7:])  # reads that end in the last chunk
        assert list(f["ids"].asstr()[:]) == ["x", "y"] and np.array_equal(f["offsets"][:], offsets)
        n_chunks = -(-n_tokens // chunk)
        assert d.id.get_num_chunks() == n_chunks
        for k in range(n_chunks):
            mask, raw = d.id.read_direct_chunk((k * chunk,))
            assert mask == 0  # the deflate filter applies to every chunk
            plain = zlib.decompress(raw)  # a complete zlib stream on its own
            assert len(plain) == chunk
            part = tokens[k * chunk : (k + 1) * chunk].tobytes()
            assert plain[: len(part)] == part and plain[len(part) :] == bytes(chunk - len(part))


def test_huffman_only_is_smaller_than_gzip_level_1_on_proteins(tmp_path, records):
    """Why it is the ingest default: protein sequences have almost no LZ77 repeats (real 64 KiB chunks)."""
    tokens = np.concatenate([t for _, t in records])[: 4 * 65536]
    offsets = np.array([0, tokens.size])
    sizes = {}
    for strategy in ("huffman_only", "default"):
        path = write_shard(tmp_path / f"{strategy}.h5", tokens, offsets, ["x"], "train", TOK.vocab(),
                           chunk_size=65536, compression_opts=1, gzip_strategy=strategy)  # fmt: skip
        with h5py.File(path, "r") as f:
            d = f["tokens"].id
            sizes[strategy] = sum(d.get_chunk_info(k).size for k in range(d.get_num_chunks()))
    assert sizes["huffman_only"] < sizes["default"] < tokens.size


def test_huffman_only_shards_through_the_reader(tmp_path, records):
    root = tmp_path / "store"
    part = records[:120]
    lengths = np.array([t.size for _, t in part])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.concatenate([t for _, t in part])
    write_shard(root / "train" / "shard-00000.h5", tokens, offsets, [a for a, _ in part], "train", TOK.vocab(),
                chunk_size=512, gzip_strategy="huffman_only")  # fmt: skip
    manifest = {"format_version": FORMAT_VERSION, "vocab": TOK.vocab(), "splits": {"train": {
        "n_sequences": 120, "shards": [{"path": "train/shard-00000.h5", "n_sequences": 120}]}}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    ds = ShardedDataset(root, "train")
    for i in np.random.default_rng(1).permutation(120):
        assert np.array_equal(ds[i], part[i][1]) and ds.get_id(i) == part[i][0]
    ds.close()


def test_gzip_strategy_is_checked(tmp_path):
    with pytest.raises(ValueError, match="gzip_strategy must be one of"):
        write_shard(
            tmp_path / "s.h5", np.full(10, 4, np.uint8), [0, 10], ["a"], "train", TOK.vocab(), gzip_strategy="rle"
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "offsets, ids, message",
    [
        ([0, 5, 3, 10], ["a", "b", "c"], "record 1 (b)"),
        ([0, 5, 10], ["a", "b", "c"], "3 ids for 2 sequences"),
        ([0, 5, 9], ["a", "b"], "offsets[-1] = 9 but there are 10 tokens"),
        ([1, 5, 10], ["a", "b"], "offsets[0] must be 0"),
    ],
)
def test_write_shard_rejects_bad_input(tmp_path, offsets, ids, message):
    path = tmp_path / "bad.h5"
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        write_shard(path, np.full(10, 4, np.uint8), np.array(offsets), ids, "train", TOK.vocab())
    assert str(path) in str(e.value)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_write_shard_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, np.full(10, 4, np.uint8), np.array([0, 10]), ["a"], "train", TOK.vocab())
    assert os.listdir(tmp_path) == []


def test_random_access_across_shard_boundaries(store, records):
    ds = ShardedDataset(store, "train")
    train = records[:371]
    assert len(ds) == 371 and len(ds.paths) == 7
    assert ds.n_residues == sum(t.size for _, t in train)
    # every record, in a shuffled order so that reads jump between shards and chunks
    for i in np.random.default_rng(0).permutation(len(ds)):
        got = ds[i]
        assert got.dtype == np.uint8
        assert np.array_equal(got, train[i][1]), f"record {i}"
    for i in (0, 52, 53, 105, 106, 370, -1):  # both sides of every boundary tested above, plus ids
        assert ds.get_id(i) == train[i][0]
    assert np.array_equal(ds.lengths(), [t.size for _, t in train])
    with pytest.raises(IndexError, match="371"):
        ds[371]
    v = ShardedDataset(store, "valid")
    assert len(v) == 29 and all(np.array_equal(v[i], records[371 + i][1]) for i in range(29))
    ds.close()


def test_handles_are_lazy_and_not_pickled(store, records):
    ds = ShardedDataset(store, "train", max_open_files=2)
    assert ds._handles == {}
    for i in (0, 60, 120, 200):  # four shards, at most two open
        ds[i]
    assert len(ds._handles) == 2 and all(f.id.valid for f, _ in ds._handles.values())
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {}
    assert np.array_equal(clone[300], records[300][1])
    # a copy "from another process" drops the inherited handles instead of using them
    inherited = dict(ds._handles)
    ds._pid = -1
    assert np.array_equal(ds[5], records[5][1])
    old = [f for f, _ in inherited.values()]
    assert ds._handles and all(f not in old for f, _ in ds._handles.values())
    ds.close()
    clone.close()
    for f in old:
        f.close()


def test_dataloader_workers_read_correct_data(store, records):
    ds = ShardedDataset(store, "train")
    ds[0]  # the parent has an open handle when the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    got = list(loader)
    assert len(got) == 371
    assert all(np.array_equal(np.asarray(g), records[i][1]) for i, g in enumerate(got))
    ds.close()


def test_missing_manifest_shard_and_version(tmp_path, store):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "manifest.json")):
        read_manifest(tmp_path / "nowhere")
    (store / "train" / "shard-00003.h5").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00003.h5"):
        ShardedDataset(store, "train")
    m = json.loads((store / "manifest.json").read_text())
    m["format_version"] = 2
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardFormatError, match="format_version 2"):
        read_manifest(store)
    with pytest.raises(ShardFormatError, match="format_version 2"):
        ShardedDataset(store, "valid")


def test_shard_count_mismatch_names_the_file(store):
    m = json.loads((store / "manifest.json").read_text())
    m["splits"]["valid"]["shards"][0]["n_sequences"] = 30
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardFormatError, match="valid/shard-00000.h5: manifest says 30"):
        ShardedDataset(store, "valid")


def test_packed_blocks_concatenate_sequences_with_eos(store, records):
    seqs = ShardedDataset(store, "train")
    train = records[:371]
    stream = np.concatenate([np.append(t, TOK.eos_id) for _, t in train]).astype(np.uint8)
    for block_size in (8192, 1000, 97):
        packed = PackedDataset(seqs, block_size, TOK.eos_id)
        assert len(packed) == -(-stream.size // block_size)
        blocks = [packed[b] for b in range(len(packed))]
        assert all(b.size == block_size for b in blocks[:-1])
        assert np.array_equal(np.concatenate(blocks), stream), f"block_size {block_size}"
        assert np.array_equal(packed.lengths(), [b.size for b in blocks])
    # a block spanning a shard boundary (shard 0 ends at stream position cum_stream[1])
    packed = PackedDataset(seqs, 1000, TOK.eos_id)
    edge = int(packed.cum_stream[1])
    b = edge // 1000
    assert b * 1000 < edge < (b + 1) * 1000
    assert np.array_equal(packed[b], stream[b * 1000 : (b + 1) * 1000])
    seqs.close()
