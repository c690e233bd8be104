"""Stage 3, per work unit: the kept records of each split, in input order, into HDF5 shards.

A unit's records are read in windows of ``WINDOW`` records; each split collects the rows (token
start, token end, id start, id end) of its records until it has ``shard_size`` of them, then
writes a shard (atomically: ``shards.write_shard`` writes a temporary name, then renames). A
shard that exists already was written by an interrupted run with the same config: it is listed
and skipped. Shard names: ``<split>/shard-NNNNN.h5`` for a single unit, else
``<split>/part-UUUU-shard-NNNNN.h5``.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protein_performer.data.fasta import decode_ids
from protein_performer.data.shards import SPLITS, write_shard
from protein_performer.data.tokenizer import Tokenizer

from .common import WINDOW, SimulatedInterruption, load_records, unit_dir
from .config import IngestConfig

_READ_IDS_BELOW = 64 << 20  # ids.bin smaller than this is read, larger is memory-mapped


@dataclass
class UnitShards:
    """What stage 3 wrote for one unit: the shard entries of each split (for the manifest) and
    the histogram of sequence lengths of each split."""

    shards: dict[str, list[dict]]
    hist: dict[str, list[int]]


def shard_name(split: str, unit: int, index: int, n_units: int) -> str:
    return f"{split}/shard-{index:05d}.h5" if n_units == 1 else f"{split}/part-{unit:04d}-shard-{index:05d}.h5"


def _add_hist(hist: np.ndarray, more: np.ndarray) -> np.ndarray:
    if more.size > hist.size:
        hist, more = more.astype(np.int64), hist
    hist = hist.astype(np.int64, copy=True)
    hist[: more.size] += more
    return hist


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _ShardWriter:
    """The shards of one unit: pending rows per split, shards written so far, length histograms."""

    def __init__(self, cfg: IngestConfig, u: int):
        self.cfg = cfg
        self.unit = u
        self.out = Path(cfg.output_dir)
        folder = unit_dir(self.out, u)
        tokens_path, ids_path = folder / "tokens.bin", folder / "ids.bin"
        # a plain ndarray view of the mapping: slicing it is cheap (a memmap slice is a Python object)
        self.tokens = (
            np.memmap(tokens_path, dtype=np.uint8, mode="r").view(np.ndarray)
            if tokens_path.stat().st_size
            else np.zeros(0, np.uint8)
        )
        self.ids_map = None
        if ids_path.stat().st_size < _READ_IDS_BELOW:
            self.ids: Any = ids_path.read_bytes()
            # valid UTF-8 (the usual case, checked once): the ids go to HDF5 as bytes, saving a decode
            # here and an encode in h5py per id; otherwise each is decoded by fasta.decode_header
            # (UTF-8 when valid, else Windows-1252/Latin-1) and stored as UTF-8
            self.ids_utf8 = _is_utf8(self.ids)
        else:
            with open(ids_path, "rb") as fh:
                self.ids_map = self.ids = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self.ids_utf8 = False
        self.vocab = Tokenizer().vocab()
        self.shard_size = int(cfg.shard_size)
        self.fail_after = cfg.fail_after_shards
        self.pending: list[list[np.ndarray]] = [[] for _ in SPLITS]  # rows: token start, end, id start, end
        self.n_pending = [0] * len(SPLITS)
        self.hist = [np.zeros(0, np.int64) for _ in SPLITS]
        self.shards: dict[str, list] = {s: [] for s in SPLITS}
        self.written = 0

    def add(self, code: int, rows: np.ndarray, lengths: np.ndarray) -> None:
        """Queue the rows of split ``code``; write its full shards."""
        self.hist[code] = _add_hist(self.hist[code], np.bincount(lengths))
        self.pending[code].append(rows)
        self.n_pending[code] += rows.shape[0]
        if self.n_pending[code] >= self.shard_size:
            self.flush(code, last=False)

    def flush(self, code: int, last: bool) -> None:
        """Write the full shards of split ``code`` (and the rest too when ``last``)."""
        pending = self.pending[code]
        rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
        while rows.shape[0] >= self.shard_size or (last and rows.shape[0]):
            self._write(code, rows[: self.shard_size])
            rows = rows[self.shard_size :]
        self.pending[code] = [rows] if rows.shape[0] else []
        self.n_pending[code] = rows.shape[0]

    def _write(self, code: int, rows: np.ndarray) -> None:
        split = SPLITS[code]
        rel = shard_name(split, self.unit, len(self.shards[split]), len(self.cfg.units))
        token_start, token_end, id_start, id_end = rows.T
        lengths = token_end - token_start
        self.shards[split].append({"path": rel, "n_sequences": int(rows.shape[0]), "n_residues": int(lengths.sum())})
        path = self.out / rel
        if path.is_file():  # written atomically by an earlier (interrupted) run with this config
            return
        # records adjacent in the unit are adjacent in tokens.bin and ids.bin: one slice per run
        breaks = np.flatnonzero(token_start[1:] != token_end[:-1]) + 1
        run_first = np.concatenate([[0], breaks])
        run_last = np.concatenate([breaks, [rows.shape[0]]]) - 1
        runs = list(zip(token_start[run_first].tolist(), token_end[run_last].tolist()))
        tokens = np.concatenate([self.tokens[a:b] for a, b in runs])
        ids: list[bytes] | list[str] = []
        for a, b in zip(id_start[run_first].tolist(), id_end[run_last].tolist()):  # one id per line
            lines = self.ids[a : b - 1]
            ids += lines.split(b"\n") if self.ids_utf8 else decode_ids(lines)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cfg = self.cfg
        write_shard(
            path, tokens, offsets, ids, split, self.vocab, chunk_size=cfg.chunk_size,
            compression=cfg.compression, compression_opts=cfg.compression_level,
            gzip_strategy=cfg.gzip_strategy,
        )  # fmt: skip
        self.written += 1
        if self.fail_after is not None and self.written >= self.fail_after:
            raise SimulatedInterruption(f"fail_after_shards={self.fail_after} reached (test hook)")

    def close(self) -> None:
        if self.ids_map is not None:
            self.ids_map.close()


def write_unit_shards(cfg: IngestConfig, u: int, final: np.ndarray) -> UnitShards:
    """Stage 3 for unit ``u``: the kept records of each split, in input order, into shards of
    ``shard_size`` sequences. The unit's records are read in windows of ``WINDOW`` records (a
    split's pending shard carries over), so memory stays bounded whatever the unit's size."""
    recs = load_records(unit_dir(Path(cfg.output_dir), u))
    writer = _ShardWriter(cfg, u)
    token_base = id_base = 0
    for start in range(0, len(recs), WINDOW):
        window = recs[start : start + WINDOW]
        codes = final[start : start + WINDOW]
        lengths = np.asarray(window["length"], dtype=np.int64)
        token_end = token_base + np.cumsum(lengths)
        id_lengths = np.asarray(window["id_len"], dtype=np.int64) + 1  # with its newline
        id_end = id_base + np.cumsum(id_lengths)
        rows = np.stack([token_end - lengths, token_end, id_end - id_lengths, id_end], axis=1)
        for code in range(len(SPLITS)):
            selected = np.flatnonzero(codes == code)
            if selected.size:
                writer.add(code, rows[selected], lengths[selected])
        token_base, id_base = int(token_end[-1]), int(id_end[-1])
    for code in range(len(SPLITS)):
        if writer.n_pending[code]:
            writer.flush(code, last=True)
    writer.close()
    return UnitShards(writer.shards, {s: h.tolist() for s, h in zip(SPLITS, writer.hist)})
