"""manifest.json, written last (atomically) by the merge: it marks the ingest complete.

It holds the vocabulary, per split the counts, length statistics and shard list, the rejected
records by reason, the input files with their sha256, and the config. Readers: shards.read_manifest.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from protein_performer.data.tokenizer import Tokenizer

from .common import DUPLICATE_CODE, FORMAT_VERSION, REJECTS_NAME, SPLITS, TRAIN_CODE
from .config import IngestConfig
from .config import fingerprint as config_fingerprint
from .rejects import ID_CONFLICT
from .write import UnitShards

SPLIT_HASH = "splitmix64(blake2b-128(tokens)[:8] ^ salt(seed)) -> [0,1) vs cumulative fractions"
DEDUP = "blake2b-128 of the token bytes; first record in input order kept"
_RUN_OPTIONS = {"workers", "block_size", "merge_memory_mb"}  # recorded in the manifest, not fingerprinted


@dataclass
class Counts:
    """Records in, records kept (unique), duplicates dropped and rejects by reason."""

    n_records: int
    n_unique: int
    n_duplicates: int
    rejected: dict[str, int]


def count_records(summaries: list[dict], final: list[np.ndarray], conflicts: list[list]) -> Counts:
    rejected = Counter()
    for summary in summaries:
        rejected.update(summary["rejected"])
    rejected[ID_CONFLICT] += sum(len(c) for c in conflicts)
    return Counts(
        n_records=sum(s["n_records"] for s in summaries),
        n_unique=sum(int((f >= TRAIN_CODE).sum()) for f in final),  # kept: a split code (dropped ones are < 0)
        n_duplicates=sum(int((f == DUPLICATE_CODE).sum()) for f in final),
        rejected={k: int(v) for k, v in rejected.items() if v},
    )


def split_summaries(results: list[UnitShards]) -> dict:
    """Per split: sequences, residues, length statistics and shards (in unit order)."""
    splits = {}
    for split in SPLITS:
        shards = [shard for r in results for shard in r.shards[split]]
        hists = [np.asarray(r.hist[split], dtype=np.int64) for r in results if r.hist[split]]
        hist = np.zeros(max((h.size for h in hists), default=0), dtype=np.int64)
        for h in hists:
            hist[: h.size] += h
        splits[split] = {
            "n_sequences": int(hist.sum()),
            "n_residues": int((hist * np.arange(hist.size)).sum()),
            "length": length_stats(hist),
            "shards": shards,
        }
    return splits


def length_stats(hist: np.ndarray) -> dict:
    """min, max, mean and median of the lengths whose histogram is ``hist``."""
    n = int(hist.sum())
    if n == 0:
        return {"min": None, "max": None, "mean": None, "median": None}
    nonzero = np.flatnonzero(hist)
    cumulative = np.cumsum(hist)
    low = int(np.searchsorted(cumulative, (n - 1) // 2, side="right"))
    high = int(np.searchsorted(cumulative, n // 2, side="right"))
    return {
        "min": int(nonzero[0]),
        "max": int(nonzero[-1]),
        "mean": float((hist * np.arange(hist.size)).sum() / n),
        "median": (low + high) / 2,
    }


def file_source(path: str) -> dict:
    """Path, sha256 and size of an input file (hashed from a memory map: no copy of the data)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    if size:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            digest.update(data)
    return {"path": path, "sha256": digest.hexdigest(), "bytes": size}


def input_sources(paths: list[str]) -> list[dict]:
    """sha256 (and size) of the input files, for the manifest."""
    return [file_source(p) for p in paths]


def build_manifest(cfg: IngestConfig, sources: list[dict], splits: dict, counts: Counts) -> dict:
    """manifest.json's content."""
    recorded = {**config_fingerprint(cfg), **{k: getattr(cfg, k) for k in _RUN_OPTIONS}}
    return {
        "format_version": FORMAT_VERSION,
        "vocab": Tokenizer().vocab(),
        "config": {k: recorded[k] for k in sorted(recorded)},
        "sources": sources,
        "splits": splits,
        "n_records": counts.n_records,
        "n_unique": counts.n_unique,
        "n_duplicates": counts.n_duplicates,
        "rejected": counts.rejected,
        "rejects_file": REJECTS_NAME,
        "length_filter": {"min": cfg.min_length, "max": cfg.max_length},
        "ood_families": cfg.ood_families,
        "annotations": [file_source(p) for p in cfg.annotations],
        "split_hash": SPLIT_HASH,
        "dedup": DEDUP,
        "fractions": cfg.fractions,
        "seed": cfg.seed,
    }
