"""FASTA(.gz) -> sharded HDF5: validation, deduplication, splits, parallel parts, merge, resume.

Pipeline (one code path for 1 worker, ``workers=N`` and SLURM ``part=i num_parts=n``)::

    units      the input cut into work units: whole files, or byte ranges of one uncompressed file
    stage 1    per unit (in parallel): parse, validate, tokenize, hash; append the valid records to
               raw files in <output_dir>/_work/unit-NNNN/ (tokens.bin, records.bin, ids.bin: one id per line) and the
               rejects to rejects.tsv; checkpoint after every block (resume continues from there)
    resolve    (merge) the first valid record of an id fixes its sequence: a later record with that
               id and another sequence is rejected (duplicate_id_conflict); among the rest, the first
               record of each sequence (global order = file order) is kept, later ones are
               duplicates. A sequence is ``ood`` when any of its records is in a held-out family,
               else train/valid/test by a salted hash of the sequence. The inputs' sha256 (for the
               manifest) is computed by a worker process right after its stage-1 unit (a thread
               after stage 1 with one worker): it fills the time that worker would wait for the
               main process's unit and this serial step, instead of taking CPU from stage 1.
    stage 3    per unit (in parallel): write the kept records' shards (atomic: temporary name, then
               rename; existing shards are complete and skipped on resume); then manifest.json
               (atomic, last) and rejects.tsv, and the raw work files are removed. With the default
               ``gzip_strategy=huffman_only`` the token chunks are deflated here with zlib's
               Huffman-only strategy and stored as they are (``write_direct_chunk``): standard
               gzip-filtered HDF5, ~1.7x faster than HDF5's level-1 filter and smaller (see shards.py).

Where the time goes (1 worker, 100k Swiss-Prot records, 36 M residues, ~0.8 s; benchmarks/ingest.py):
stage 1 ~45% (regex record split + translate, one BLAKE2b per sequence, raw files), Huffman
deflate of the tokens ~35%, the rest of stage 3 (ids, HDF5) ~10%, resolve ~3%. The per-record
Python work is list comprehensions over C-level ``bytes`` methods; per-batch work (id keys, OOD
family tokens, line numbers) is NumPy or one regex scan. With ``workers=2`` the serial part
(start-up, resolve, manifest) is ~5% of the 1-worker time: the workers are plain forked processes
with a pipe each (``_Workers``), because the start-up and teardown of ``multiprocessing.Pool``
alone cost as much as the resolve step.

Dedup and splits depend only on the records and their global order, never on how the input was
cut, so ``workers=N`` and part/merge give the same sequences, ids and splits as one worker (shard
boundaries and file names differ: ``shard-NNNNN.h5`` for one unit, ``part-NNNN-shard-NNNNN.h5``
otherwise; the manifest lists them in global order).

Hashes: the dedup key is BLAKE2b-128 of the token bytes (so case and a trailing ``*`` do not
matter); the split is splitmix64(first 64 bits of that hash XOR a salt derived from ``seed``),
mapped to [0, 1) and compared with the cumulative fractions. Both are plain arithmetic on bytes:
the same on every machine and every run. Ids are grouped by a 128-bit key that is the id itself
when it has at most 15 bytes, its BLAKE2b-128 otherwise (``_id_keys``).

Memory: stage 1 holds one block (1 MiB by default) and the set of OOD accessions; the resolve step
sorts 48 bytes per record in buckets of at most ``merge_memory_mb`` (the hash arrays are read from
disk, in windows of 4 M records, once per bucket) and keeps 1 byte per record (its final split);
stage 3 reads the records in windows and holds one shard. So peak memory stays bounded: about
``merge_memory_mb`` + 1 byte per record (250 MB for all of TrEMBL) + one shard.
Disk: the raw work files take about the size of the tokens plus 60 bytes per record until the
merge finishes.

SLURM: ``python -m protein_performer.ingest -m hydra/launcher=submitit_slurm part='range(0,16)'
num_parts=16 input=/data/uniprot_trembl.fasta output_dir=/data/trembl_shards`` runs the 16 stage-1
parts as an array job; then ``python -m protein_performer.ingest merge=true
output_dir=/data/trembl_shards workers=16`` resolves and writes the shards and the manifest.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import mmap
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue
import re
import shutil
import sys
import threading
import time
from bisect import bisect_right
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from protein_performer.data.fasta import (
    FastaFormatError, count_newlines, decode_header, decode_ids, find_record_start, is_gzip, iter_batches, open_binary,
)  # fmt: skip
from protein_performer.data.shards import GZIP_STRATEGIES, SPLITS, write_shard
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WORK_DIR = "_work"
CONFIG_NAME = "ingest_config.json"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.tsv"
SLURM_LOG_DIR = "_slurm"  # hydra.sweep.dir in conf/ingest.yaml (multirun / submitit logs)
HASH_SPLITS = ("train", "valid", "test")
OOD_CODE = 3  # index of "ood" in SPLITS
REJECT_REASONS = (
    "header_only", "missing_id", "empty_sequence", "invalid_character", "too_short", "too_long",
    "duplicate_id_conflict",
)  # fmt: skip

# One raw record of stage 1 (records.bin): sequence length, BLAKE2b-128 of the tokens, a 128-bit key
# of the id (see _id_keys), id length in bytes, header line (relative to the unit's first record), the hash split
# (0 train, 1 valid, 2 test) and whether the record is in a held-out family.
REC = np.dtype(
    [("length", "<i8"), ("seq", "<u8", (2,)), ("idh", "<u8", (2,)), ("id_len", "<i4"),
     ("line", "<i8"), ("hsplit", "u1"), ("ood", "u1")]
)  # fmt: skip

PAPER_OOD_FAMILIES = [
    "PF18369", "PF04680", "PF17988", "PF12325", "PF03272", "PF03938", "PF17724", "PF10696",
    "PF11968", "PF04153", "PF06173", "PF12378", "PF04420", "PF10841", "PF06917", "PF03492",
    "PF06905", "PF15340", "PF17055", "PF05318",
]  # fmt: skip

# Keys of the config that change the output; an output dir written with other values is refused.
FINGERPRINT_KEYS = (
    "input", "annotations", "ood_families", "seed", "fractions", "min_length", "max_length",
    "shard_size", "compression", "compression_level", "gzip_strategy", "chunk_size", "strict", "units",
)  # fmt: skip

_PF_RE = re.compile(rb"PF\d{5}")
_WINDOW = 1 << 22  # records read at a time in merge (resolve and shard writing)
_SPTR = (b"sp|", b"tr|")
_M64 = (1 << 64) - 1


class IngestError(UserError, RuntimeError):
    """An ingestion that cannot go on; the message says where and what to do."""


class SimulatedInterruption(RuntimeError):
    """Raised by the ``fail_after_records`` / ``fail_after_shards`` test hooks."""


# ============================================================================ configuration
def default_config() -> dict:
    """The defaults of conf/ingest.yaml (without the ``hydra`` node), as a plain dict.

    Read with PyYAML's C loader (OmegaConf's pure-Python loader took ~10 ms, a serial cost of
    every ingest). The file's values are plain YAML; its only interpolations are in the ``hydra``
    node, which is dropped.
    """
    path = Path(__file__).resolve().parents[1] / "conf" / "ingest.yaml"
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    cfg.pop("hydra", None)
    cfg.pop("defaults", None)
    return cfg


def resolve_config(cfg: Any = None, **overrides) -> dict:
    """Defaults < ``cfg`` (dict or DictConfig) < ``overrides``; paths made absolute; checked."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out = default_config()
    for src in (cfg or {}, overrides):
        for k, v in dict(src).items():
            if k in ("hydra", "defaults"):
                continue
            if k not in out:
                raise IngestError(f"unknown ingest option {k!r}; known options: {', '.join(sorted(out))}")
            out[k] = v
    if not out.get("output_dir"):
        raise IngestError("output_dir is required: python -m protein_performer.ingest input=... output_dir=...")
    out["output_dir"] = str(Path(out["output_dir"]).expanduser().absolute())
    if out["merge"]:
        return out
    inputs = out["input"]
    if inputs in (None, "", "???"):
        raise IngestError("input is required: a FASTA(.gz) path or a list of paths (input='[a.fa,b.fa]')")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out["input"] = [str(Path(p).expanduser().absolute()) for p in inputs]
    for p in out["input"]:
        if Path(p).is_dir():
            raise IngestError(
                f"input {p} is a directory; give a FASTA file, or a list of files: input='[a.fasta.gz,b.fasta.gz]'"
            )
        if not Path(p).is_file():
            raise IngestError(f"input file not found: {p}")
    ann = out["annotations"]
    if ann:
        ann = [ann] if isinstance(ann, (str, os.PathLike)) else list(ann)
        out["annotations"] = [str(Path(p).expanduser().absolute()) for p in ann]
        for p in out["annotations"]:
            if not Path(p).is_file():
                raise IngestError(f"annotation file not found (or a directory): {p}")
    else:
        out["annotations"] = []
    out["ood_families"] = [_norm_family(f) for f in (out["ood_families"] or [])]
    fr = {k: float(out["fractions"][k]) for k in HASH_SPLITS}
    if set(out["fractions"]) != set(HASH_SPLITS) or min(fr.values()) < 0 or abs(sum(fr.values()) - 1) > 1e-9:
        raise IngestError(f"fractions must give train, valid, test >= 0 summing to 1, got {dict(out['fractions'])}")
    out["fractions"] = fr
    if out["gzip_strategy"] not in GZIP_STRATEGIES:
        raise IngestError(f"gzip_strategy must be one of {', '.join(GZIP_STRATEGIES)}, got {out['gzip_strategy']!r}")
    if int(out["shard_size"]) < 1:
        raise IngestError(f"shard_size must be >= 1 sequences, got {out['shard_size']}")
    if out["min_length"] is not None and out["max_length"] is not None and out["min_length"] > out["max_length"]:
        raise IngestError(f"min_length {out['min_length']} > max_length {out['max_length']}")
    out["units"] = plan_units(out["input"], int(out["workers"]), out["num_parts"])
    return out


def _norm_family(f: Any) -> str:
    f = str(f).strip()
    return f.split(".")[0] if re.fullmatch(r"PF\d{5}(\.\d+)?", f) else f


def plan_units(inputs: list[str], workers: int, num_parts: int | None) -> list[dict]:
    """Cut the input into work units: {"file": index, "start": byte, "end": byte or None}."""
    whole = [{"file": i, "start": 0, "end": None} for i in range(len(inputs))]
    if num_parts is not None:
        num_parts = int(num_parts)
        if num_parts < 1:
            raise IngestError(f"num_parts must be >= 1, got {num_parts}")
        if len(inputs) == num_parts:
            return whole
        if len(inputs) == 1:
            return _byte_ranges(inputs[0], num_parts)
        raise IngestError(
            f"num_parts={num_parts} with {len(inputs)} input files: give one input file per part "
            f"({num_parts} files), or a single uncompressed FASTA file to cut into byte ranges"
        )
    if workers > 1 and len(inputs) == 1:
        if is_gzip(inputs[0]):
            log.warning(
                "%s is gzip-compressed: it cannot be cut into byte ranges, so it is read by one worker. "
                "For parallel ingestion decompress it, or give several input files (one per worker).",
                inputs[0],
            )
            return whole
        return _byte_ranges(inputs[0], workers)
    return whole


def _byte_ranges(path: str, n: int) -> list[dict]:
    if is_gzip(path):
        raise IngestError(
            f"{path} is gzip-compressed: byte ranges (part/num_parts, workers) need an uncompressed "
            "file (gzip streams cannot be entered in the middle). Decompress it (`gunzip -k`), or "
            "split the input into several files and pass them as a list, one per part: "
            "input='[part0.fasta.gz,part1.fasta.gz,...]' num_parts=<number of files>."
        )
    size = os.path.getsize(path)
    return [{"file": 0, "start": size * i // n, "end": size * (i + 1) // n} for i in range(n)]


def _fingerprint(cfg: dict) -> dict:
    return {k: cfg[k] for k in FINGERPRINT_KEYS}


# ============================================================================ annotations / OOD
def load_ood_accessions(paths: Iterable[str], families: Iterable[str]) -> set[bytes]:
    """Accessions (bytes, without version) annotated with one of ``families``, from TSV files.

    Layouts, detected by the header line: Pfam's ``Pfam-A.regions.uniprot.tsv`` (a ``pfamA_acc``
    column; the accession is the first column), the ``accession hmm hmm_acc ...`` hits table
    (family by name or accession), or a plain ``accession<TAB>family`` table (header optional).
    The file is streamed; only the accessions of the wanted families are kept.
    """
    fams = {f.encode() for f in families}
    out: set[bytes] = set()
    if not fams:
        return out
    for path in paths:
        with open_binary(path) as fh:
            first = fh.readline()
            cols = [c.strip().lower() for c in first.rstrip(b"\r\n").split(b"\t")]
            if b"pfama_acc" in cols:
                acc_col, fam_cols = 0, [cols.index(b"pfama_acc")]
            elif b"hmm" in cols or b"hmm_acc" in cols:
                acc_col = cols.index(b"accession") if b"accession" in cols else 0
                fam_cols = [cols.index(c) for c in (b"hmm", b"hmm_acc") if c in cols]
            elif cols and cols[0] in (b"accession", b"acc", b"uniprot_acc", b"pfamseq_acc", b"id") and len(cols) >= 2:
                acc_col, fam_cols = 0, [1]
            else:  # no header: plain two columns, or the regions layout (7 columns, PF in the 5th)
                acc_col, fam_cols = 0, ([4] if len(cols) == 7 else [1])
                fh.seek(0)
            n_lines = 0
            for line in fh:
                n_lines += 1
                f = line.rstrip(b"\r\n").split(b"\t")
                if len(f) <= max(fam_cols):
                    if line.strip():
                        raise IngestError(
                            f"{path}:{n_lines + 1}: annotation line has {len(f)} tab-separated columns, "
                            f"expected at least {max(fam_cols) + 1}; fix the file or remove it from annotations"
                        )
                    continue
                for c in fam_cols:
                    fam = f[c].strip()
                    if fam[:2] == b"PF":
                        fam = fam.split(b".")[0]
                    if fam in fams:
                        out.add(f[acc_col].strip().split(b".")[0])
                        break
    log.info("annotations: %d accessions in the %d held-out families", len(out), len(fams))
    return out


# ============================================================================ hashing
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic, identical on every machine)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_codes(seq_hash_hi: np.ndarray, seed: int, fractions: dict) -> np.ndarray:
    """0 train / 1 valid / 2 test from the first 64 bits of the sequence hash and the seed."""
    salt = _mix64(np.array([(int(seed) + 0x9E3779B97F4A7C15) & _M64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _mix64(seq_hash_hi.astype(np.uint64) ^ salt)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    t, v = fractions["train"], fractions["train"] + fractions["valid"]
    return np.where(u < t, 0, np.where(u < v, 1, 2)).astype(np.uint8)


def parse_header(h: bytes) -> tuple[bytes, bytes]:
    """(id, accession) from a header without '>': ``sp|ACC|NAME``/``tr|ACC|NAME`` -> ACC,
    ``UniRef50_ACC`` -> id ``UniRef50_ACC``, accession ``ACC``; otherwise the first word."""
    w = h.split(None, 1)
    w = w[0] if w else b""
    if w[:3] in (b"sp|", b"tr|"):
        f = w.split(b"|")
        return f[1], f[1]
    if w[:6] == b"UniRef":
        return w, w.partition(b"_")[2]
    return w, w


# ============================================================================ stage 1
class _UnitFiles:
    names = ("tokens.bin", "records.bin", "ids.bin", "rejects.tsv")

    def __init__(self, d: Path, sizes: dict | None):
        d.mkdir(parents=True, exist_ok=True)
        self.fh = {}
        for n in self.names:
            p = d / n
            if sizes is None:
                p.write_bytes(b"")
            else:
                with open(p, "ab") as f:
                    f.truncate(sizes[n])
            self.fh[n] = open(p, "ab")

    def sizes(self) -> dict:
        for f in self.fh.values():
            f.flush()
        return {n: f.tell() for n, f in self.fh.items()}

    def close(self):
        for f in self.fh.values():
            f.close()


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _unit_dir(out: Path, u: int) -> Path:
    return out / WORK_DIR / f"unit-{u:04d}"


def run_unit(cfg: dict, u: int, resume: bool = False, position: int = 0) -> dict:
    """Stage 1 for work unit ``u``: parse, validate, tokenize and hash; write raw files + rejects."""
    out = Path(cfg["output_dir"])
    unit = cfg["units"][u]
    path = cfg["input"][unit["file"]]
    d = _unit_dir(out, u)
    done = d / "done.json"
    if resume and done.is_file():
        log.info("unit %d (%s) already complete: skipped", u, path)
        return json.loads(done.read_text())
    ckpt_path = d / "checkpoint.json"
    ckpt = json.loads(ckpt_path.read_text()) if (resume and ckpt_path.is_file()) else None
    if ckpt is None and d.exists():
        shutil.rmtree(d)
    files = _UnitFiles(d, ckpt["sizes"] if ckpt else None)
    state = ckpt or {
        "offset": unit["start"], "line": 1, "first_offset": None, "n_records": 0, "n_valid": 0,
        "n_residues": 0, "rejected": {}, "sizes": files.sizes(),
    }  # fmt: skip
    if ckpt:
        log.info("unit %d: resuming at byte %d (%d records done)", u, state["offset"], state["n_records"])
    table = token_table()
    ood_acc = load_ood_accessions(cfg["annotations"], cfg["ood_families"])
    ood_tokens = {f.encode() for f in cfg["ood_families"] if f.startswith("PF")}
    ctx = dict(
        ood_acc=ood_acc, ood_tokens=ood_tokens, min_len=cfg["min_length"], max_len=cfg["max_length"],
        seed=cfg["seed"], fractions=cfg["fractions"], strict=cfg["strict"], path=path, unit=unit, state=state,
    )  # fmt: skip
    fail_after = cfg.get("fail_after_records")
    bar = tqdm(
        desc=f"ingest {Path(path).name}" + (f" [{u}]" if len(cfg["units"]) > 1 else ""),
        unit=" seq", unit_scale=True, disable=not cfg["progress"], position=position, leave=position == 0,
        initial=state["n_records"], mininterval=1.0,
    )  # fmt: skip
    t0, res0 = time.perf_counter(), state["n_residues"]
    try:
        for batch in iter_batches(
            path, start=state["offset"], end=unit["end"], line0=state["line"], block_size=cfg["block_size"],
            table=table,
        ):
            if state["first_offset"] is None and len(batch):
                state["first_offset"] = batch.offsets[0]
            tokens, recs, ids_blob, rejects = _process_batch(batch, ctx)
            files.fh["tokens.bin"].write(tokens.data)
            files.fh["records.bin"].write(recs.data)
            files.fh["ids.bin"].write(ids_blob)
            if rejects:
                files.fh["rejects.tsv"].write("".join("\t".join(map(str, r)) + "\n" for r in rejects).encode())
            state["n_records"] += len(batch)
            state["n_valid"] += len(recs)
            state["n_residues"] += int(tokens.size)
            for r in rejects:
                state["rejected"][r[3]] = state["rejected"].get(r[3], 0) + 1
            if fail_after is not None and state["n_records"] >= fail_after:
                raise SimulatedInterruption(f"fail_after_records={fail_after} reached (test hook)")
            state["offset"], state["line"] = batch.end_offset, batch.end_line
            state["sizes"] = files.sizes()
            _atomic_json(ckpt_path, state)
            bar.update(len(batch))
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{(state['n_residues'] - res0) / dt / 1e6:.1f}M res/s", refresh=False)
    except FastaFormatError as e:
        if e.line is None or unit["start"] == 0:
            raise
        # a byte range counts its lines from its first record: make the line absolute
        first = find_record_start(path, unit["start"])
        raise FastaFormatError(e.path, e.message, line=e.line + count_newlines(path, first)) from None
    finally:
        files.close()
        bar.close()
    line_base = 0
    if unit["start"] > 0 and state["first_offset"] is not None:
        line_base = count_newlines(path, state["first_offset"]) if state["rejected"] else None
    summary = {
        "unit": u, "file": unit["file"], "path": path, "n_records": state["n_records"],
        "n_valid": state["n_valid"], "n_residues": state["n_residues"], "rejected": state["rejected"],
        "line_base": line_base,
    }  # fmt: skip
    _atomic_json(done, summary)
    log.info("unit %d: %d records, %d valid, rejected %s", u, state["n_records"], state["n_valid"], state["rejected"])
    return summary


def _reject_error(ctx, line, rid, reason, detail) -> IngestError:
    unit, path = ctx["unit"], ctx["path"]
    if unit["start"] > 0:  # lines are counted from the unit's first record: make them absolute
        line = count_newlines(path, ctx["state"]["first_offset"]) + line
    return IngestError(
        f"{path}:{line}: record {rid!r} rejected: {reason} ({detail}). Fix the record, or run with "
        "strict=false to skip such records (they are counted in the manifest and listed in rejects.tsv)."
    )


def token_table() -> bytes:
    """bytes.translate table: residue letters (either case) -> token ids, '*' -> STAR, else BAD."""
    t = Tokenizer()._encode_table.copy()  # invalid -> 255
    t[ord("*")] = STAR
    return t.tobytes()


STAR, BAD = 254, 255
_STAR_B, _BAD_B = bytes([STAR]), bytes([BAD])
# BLAKE2b-128 with the digest size bound once: the keyword parsing is a good part of a per-record call
_blake2b_128 = functools.partial(hashlib.blake2b, digest_size=16)


def _id_keys(ids: list[bytes], lengths: np.ndarray) -> np.ndarray:
    """128-bit keys of record ids, uint64 ``(n, 2)``: equal keys mean equal ids (the ``idh`` field).

    Ids are grouped (duplicate_id_conflict) by these keys only. A BLAKE2b call per id costs about
    as much as the rest of the id handling, yet accessions are short: an id of at most 15 bytes is
    its own key (zero-padded, its length in byte 15), packed by NumPy for the whole batch. A longer
    id gets its BLAKE2b-128 digest with byte 15 set to 0xFF (never a length), so the two kinds
    cannot meet. A bijective splitmix64 mix then spreads the keys: the resolve step sorts on, and
    buckets by, their first 64 bits.
    """
    n = len(ids)
    lengths = np.asarray(lengths)
    long = np.flatnonzero(lengths > 15)
    if long.size == n:  # all long (UniRef ids, say): digests only
        raw = np.frombuffer(b"".join([_blake2b_128(i).digest() for i in ids]), np.uint8).reshape(n, 16).copy()
        raw[:, 15] = 0xFF
    else:
        raw = np.array(ids, dtype="S16").view(np.uint8).reshape(n, 16)  # longer ids truncated: replaced below
        raw[:, 15] = np.minimum(lengths, 255)
        if long.size:
            digests = b"".join([_blake2b_128(ids[i]).digest() for i in long.tolist()])
            raw[long] = np.frombuffer(digests, np.uint8).reshape(-1, 16)
            raw[long, 15] = 0xFF
    words = raw.view("<u8")
    hi = _mix64(words[:, 1])
    return np.stack([_mix64(words[:, 0] ^ hi), hi], axis=1)


def _records_with_family_token(headers: list[bytes], families: set[bytes]) -> list[int]:
    """Indices of the headers that name one of ``families`` (``PF01234`` tokens).

    One regex scan over the batch's joined headers instead of a Python test per record: most
    batches have no such token at all, and a hit is mapped back to its header by bisection.
    """
    joined = b"\n".join(headers)
    if b"PF" not in joined:
        return []
    hits = [m.start() for m in _PF_RE.finditer(joined) if m.group() in families]
    if not hits:
        return []
    starts = list(accumulate((len(h) + 1 for h in headers), initial=0))
    return [bisect_right(starts, pos) - 1 for pos in hits]


def _tsv(text: str) -> str:
    """A field of rejects.tsv: no tab or line break inside (an id never has one; be safe)."""
    return text.translate(_TSV_SAFE) if ("\t" in text or "\r" in text or "\n" in text) else text


_TSV_SAFE = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def _take(keep: list[int], *columns: list) -> tuple[list, ...]:
    """The records ``keep`` of each parallel per-record list (the valid ones, in order)."""
    return tuple([col[i] for i in keep] for col in columns)


def _process_batch(batch, ctx) -> tuple[np.ndarray, np.ndarray, bytes, list]:
    """Validate and hash one batch whose sequences are already token bytes (see token_table).

    Returns tokens, REC records, the ids blob (one id per line) and the reject rows. The common
    case (no defect in the batch) is a few list comprehensions over C-level bytes methods; the
    per-record checks run only for a batch that holds a defect.
    """
    fname = Path(ctx["path"]).name
    rejects: list[tuple] = []
    headers, seqs, c_lines = batch.headers, batch.sequences, batch.lines
    words = [h.partition(b" ")[0] for h in headers]  # first word, fast path
    if not all(words) or (b"\t" in batch.block and any(b"\t" in w for w in words)):
        words = [(h.split(None, 1) or (b"",))[0] for h in headers]
    c_ids = [w.split(b"|")[1] if w[:3] in _SPTR else w for w in words]
    joined = b"".join(seqs)
    if _STAR_B in joined:  # strip one trailing stop symbol
        seqs = [q[:-1] if q[-1:] == _STAR_B else q for q in seqs]
        joined = b"".join(seqs)
    if _BAD_B in joined or _STAR_B in joined or not all(seqs) or not all(c_ids):
        keep_idx = []
        for i, (q, rid) in enumerate(zip(seqs, c_ids)):
            if not batch.sequences[i]:
                reason, detail = "header_only", "a header line with no sequence line after it"
            elif not rid:
                reason, detail = "missing_id", "empty header line"
            elif not q:
                reason, detail = "empty_sequence", "the sequence lines hold no residue"
            elif _BAD_B in q or _STAR_B in q:
                pos = min(j for j in (q.find(_BAD_B), q.find(_STAR_B)) if j >= 0)
                c = batch.raw_sequence(i)[pos]
                what = f"character {chr(c)!r}" if c < 128 else f"non-ASCII byte 0x{c:02x}"
                reason, detail = "invalid_character", f"{what} at residue {pos + 1}"
            else:
                keep_idx.append(i)
                continue
            rejects.append((fname, c_lines[i], _tsv(decode_header(rid)), reason, detail))
        seqs, c_ids, c_lines, headers, words = _take(keep_idx, seqs, c_ids, c_lines, headers, words)
        joined = None
    mn, mx = ctx["min_len"], ctx["max_len"]
    if mn is not None or mx is not None:
        keep_idx = []
        for i, q in enumerate(seqs):
            n_q = len(q)
            if mn is not None and n_q < mn:
                reason, detail = "too_short", f"length {n_q} < min_length {mn}"
            elif mx is not None and n_q > mx:
                reason, detail = "too_long", f"length {n_q} > max_length {mx}"
            else:
                keep_idx.append(i)
                continue
            rejects.append((fname, c_lines[i], _tsv(decode_header(c_ids[i])), reason, detail))
        if len(keep_idx) < len(seqs):
            seqs, c_ids, c_lines, headers, words = _take(keep_idx, seqs, c_ids, c_lines, headers, words)
            joined = None
    if rejects:
        rejects.sort(key=lambda r: r[1])
        if ctx["strict"]:  # the first bad record of the batch, by line
            _, line, rid_s, reason, detail = rejects[0]
            raise _reject_error(ctx, line, rid_s, reason, detail)
    n = len(seqs)
    recs = np.zeros(n, dtype=REC)
    if not n:
        return np.zeros(0, np.uint8), recs, b"", rejects
    ood_acc, ood_tokens = ctx["ood_acc"], ctx["ood_tokens"]
    if ood_acc:
        recs["ood"] = [
            acc in ood_acc or (b"." in acc and acc.split(b".")[0] in ood_acc)
            for acc in (w.partition(b"_")[2] if w[:6] == b"UniRef" else rid for w, rid in zip(words, c_ids))
        ]
    if ood_tokens:
        recs["ood"][_records_with_family_token(headers, ood_tokens)] = 1
    b2 = _blake2b_128
    recs["length"] = list(map(len, seqs))
    recs["seq"] = np.frombuffer(b"".join([b2(q).digest() for q in seqs]), "<u8").reshape(n, 2)
    recs["id_len"] = list(map(len, c_ids))
    recs["idh"] = _id_keys(c_ids, recs["id_len"])
    recs["line"] = c_lines
    recs["hsplit"] = split_codes(recs["seq"][:, 0], ctx["seed"], ctx["fractions"])
    tokens = np.frombuffer(b"".join(seqs) if joined is None else joined, dtype=np.uint8)  # (joined: no reject)
    return tokens, recs, b"\n".join(c_ids) + b"\n", rejects


# ============================================================================ resolve (merge)
def _load_records(d: Path, in_memory_below: int = 64 << 20) -> np.ndarray:
    p = d / "records.bin"
    size = p.stat().st_size
    if size == 0:
        return np.zeros(0, dtype=REC)
    if size < in_memory_below:  # small: read (faster field access); large: map
        return np.fromfile(p, dtype=REC)
    return np.memmap(p, dtype=REC, mode="r")


def _first_occurrence(key: np.ndarray, gidx: np.ndarray):
    """Group equal 128-bit keys; the member with the smallest ``gidx`` is the group's first.

    Returns ``order`` (entries sorted by key), ``is_first`` and ``first_pos`` (for each sorted
    entry, the sorted position of its group's first) and the group ``starts``. A plain sort on
    the first 64 bits is enough unless two different keys share them; then a full lexsort.
    """
    n = len(key)
    hi = np.ascontiguousarray(key[:, 0])
    order = np.argsort(hi)
    new = np.ones(n, dtype=bool)  # True where a group of equal keys starts
    if n > 1:
        hi = hi[order]
        same = hi[1:] == hi[:-1]
        if same.any():  # (the second halves are compared only where the first ones are equal)
            lo = key[:, 1][order]
            if (same & (lo[1:] != lo[:-1])).any():
                order = np.lexsort((gidx, key[:, 1], key[:, 0]))
                k = key[order]
                same = (k[1:, 0] == k[:-1, 0]) & (k[1:, 1] == k[:-1, 1])
        new[1:] = ~same
    g = gidx[order]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, n))
    gmin = np.minimum.reduceat(g, starts) if n else g
    is_first = g == np.repeat(gmin, sizes)
    first_pos = np.repeat(np.flatnonzero(is_first), sizes)
    return order, is_first, first_pos, starts


def _resolve(out: Path, n_units: int, memory_mb: float) -> tuple[list[np.ndarray], list[list[int]]]:
    """Per unit: final split code per record (-1 dropped duplicate, -2 id conflict) and, for the
    conflicts, the global index of the record that fixed the id's sequence."""
    recs = [_load_records(_unit_dir(out, u)) for u in range(n_units)]
    sizes = np.array([len(r) for r in recs], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)])
    total = int(base[-1])
    n_buckets = max(1, math.ceil(total * 48 / (memory_mb * 2**20)))
    final = [np.where(r["ood"] == 1, OOD_CODE, r["hsplit"]).astype(np.int8) for r in recs]
    conflict_with: list[dict[int, int]] = [dict() for _ in range(n_units)]

    def gather(field: str, b: int, skip_conflicts: bool = False, extra: str | None = None):
        """The ``field`` keys of bucket b, all units, in input order, with their global indices and
        the ``extra`` field ("seq" or "ood") if asked (read in windows: bounded memory)."""
        keys, gids, extras = [], [], []
        for u, r in enumerate(recs):
            for w0 in range(0, len(r), _WINDOW):
                sub = r[w0 : w0 + _WINDOW]
                k = np.asarray(sub[field])
                sel = None if n_buckets == 1 else (k[:, 0] % np.uint64(n_buckets) == b)
                if skip_conflicts:
                    ok = final[u][w0 : w0 + _WINDOW] != -2
                    sel = ok if sel is None else sel & ok
                if sel is None or sel.all():  # the whole window (one bucket): slices, no index copies
                    i = slice(None)
                    gids.append(np.arange(w0 + base[u], w0 + base[u] + len(sub)))
                else:
                    i = np.flatnonzero(sel)
                    gids.append(i + (w0 + base[u]))
                keys.append(k[i])
                if extra:
                    extras.append(np.asarray(sub[extra])[i])
        if not keys:
            return None
        return np.concatenate(keys), np.concatenate(gids), np.concatenate(extras) if extra else None

    def unit_of(g: np.ndarray):
        u = np.searchsorted(base, g, side="right") - 1
        return u, g - base[u]

    # 1. id conflicts: the first valid record of an id fixes its sequence
    for b in range(n_buckets):
        got = gather("idh", b)
        if got is None:
            continue
        hi = np.sort(got[0][:, 0])
        if not (hi[1:] == hi[:-1]).any():  # every id once (the usual case): nothing to group
            continue
        key, gidx, seq = gather("idh", b, extra="seq")
        order, _, first_pos, _ = _first_occurrence(key, gidx)
        s = seq[order]
        bad = (s[:, 0] != s[first_pos, 0]) | (s[:, 1] != s[first_pos, 1])
        for g, g0 in zip(gidx[order][bad].tolist(), gidx[order][first_pos[bad]].tolist()):
            uu, ii = unit_of(np.array([g]))
            final[int(uu[0])][int(ii[0])] = -2
            conflict_with[int(uu[0])][int(ii[0])] = g0
    # 2. duplicates: the first record of a sequence is kept; ood if any of its records is ood
    for b in range(n_buckets):
        got = gather("seq", b, skip_conflicts=True, extra="ood")
        if got is None:
            continue
        key, gidx, ood = got
        order, is_first, _, starts = _first_occurrence(key, gidx)
        g_sorted = gidx[order]
        dup_u, dup_i = unit_of(g_sorted[~is_first])
        for uu in np.flatnonzero(np.bincount(dup_u, minlength=n_units)):  # the units present
            final[uu][dup_i[dup_u == uu]] = -1
        if not ood.any():  # no held-out record in this bucket: the kept keep their split
            continue
        any_ood = np.maximum.reduceat(ood[order], starts)
        kept_u, kept_i = unit_of(g_sorted[is_first])  # one per group, in group order
        for uu in np.flatnonzero(np.bincount(kept_u, minlength=n_units)):
            m = (kept_u == uu) & (any_ood == 1)
            final[uu][kept_i[m]] = OOD_CODE
    conflicts = [sorted(c.items()) for c in conflict_with]
    return final, conflicts


# ============================================================================ stage 3
def _shard_name(split: str, u: int, k: int, n_units: int) -> str:
    return f"{split}/shard-{k:05d}.h5" if n_units == 1 else f"{split}/part-{u:04d}-shard-{k:05d}.h5"


def _add_hist(h: np.ndarray, more: np.ndarray) -> np.ndarray:
    if more.size > h.size:
        h, more = more.astype(np.int64), h
    h = h.astype(np.int64, copy=True)
    h[: more.size] += more
    return h


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write_unit_shards(cfg: dict, u: int, final: np.ndarray) -> dict:
    """Stage 3 for unit ``u``: the kept records of each split, in input order, into shards of
    ``shard_size`` sequences. The unit's records are read in windows of ``_WINDOW`` records (a
    split's pending shard carries over), so memory stays bounded whatever the unit's size."""
    out = Path(cfg["output_dir"])
    d = _unit_dir(out, u)
    recs = _load_records(d)
    tok_path, ids_path = d / "tokens.bin", d / "ids.bin"
    # a plain ndarray view of the mapping: slicing it is cheap (a memmap slice is a Python object)
    tok = np.memmap(tok_path, dtype=np.uint8, mode="r").view(np.ndarray) if tok_path.stat().st_size else np.zeros(0, np.uint8)
    ids_mm = None
    if ids_path.stat().st_size < (64 << 20):
        ids_src: Any = ids_path.read_bytes()
        # valid UTF-8 (the usual case, checked once): the ids go to HDF5 as bytes, saving a decode
        # here and an encode in h5py per id; otherwise each is decoded by fasta.decode_header
        # (UTF-8 when valid, else Windows-1252/Latin-1) and stored as UTF-8
        ids_utf8 = _is_utf8(ids_src)
    else:
        with open(ids_path, "rb") as fh:
            ids_mm = ids_src = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        ids_utf8 = False
    vocab = Tokenizer().vocab()
    size = int(cfg["shard_size"])
    fail_after = cfg.get("fail_after_shards")
    n_units = len(cfg["units"])
    pending: list[list[np.ndarray]] = [[] for _ in SPLITS]  # rows: token start, end, id start, end
    n_pending = [0] * len(SPLITS)
    hist = [np.zeros(0, np.int64) for _ in SPLITS]
    shards: dict[str, list] = {s: [] for s in SPLITS}
    written = 0

    def write(code: int, rows: np.ndarray) -> None:
        nonlocal written
        split = SPLITS[code]
        rel = _shard_name(split, u, len(shards[split]), n_units)
        ts, te, i_s, i_e = rows.T
        lens = te - ts
        shards[split].append({"path": rel, "n_sequences": int(rows.shape[0]), "n_residues": int(lens.sum())})
        path = out / rel
        if path.is_file():  # written atomically by an earlier (interrupted) run with this config
            return
        # records adjacent in the unit are adjacent in tokens.bin and ids.bin: one slice per run
        brk = np.flatnonzero(ts[1:] != te[:-1]) + 1
        run_s = np.concatenate([[0], brk])
        run_e = np.concatenate([brk, [rows.shape[0]]]) - 1
        tokens = np.concatenate([tok[a:b] for a, b in zip(ts[run_s].tolist(), te[run_e].tolist())])
        ids: list[bytes] | list[str] = []
        for a, b in zip(i_s[run_s].tolist(), i_e[run_e].tolist()):  # one id per line
            lines = ids_src[a : b - 1]
            ids += lines.split(b"\n") if ids_utf8 else decode_ids(lines)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        write_shard(
            path, tokens, offsets, ids, split, vocab, chunk_size=cfg["chunk_size"],
            compression=cfg["compression"], compression_opts=cfg["compression_level"],
            gzip_strategy=cfg["gzip_strategy"],
        )  # fmt: skip
        written += 1
        if fail_after is not None and written >= fail_after:
            raise SimulatedInterruption(f"fail_after_shards={fail_after} reached (test hook)")

    def flush(code: int, last: bool) -> None:
        rows = np.concatenate(pending[code]) if len(pending[code]) > 1 else pending[code][0]
        while rows.shape[0] >= size or (last and rows.shape[0]):
            write(code, rows[:size])
            rows = rows[size:]
        pending[code] = [rows] if rows.shape[0] else []
        n_pending[code] = rows.shape[0]

    tok_base = id_base = 0
    for w0 in range(0, len(recs), _WINDOW):
        rec = recs[w0 : w0 + _WINDOW]
        fin = final[w0 : w0 + _WINDOW]
        lens = np.asarray(rec["length"], dtype=np.int64)
        te = tok_base + np.cumsum(lens)
        id_lens = np.asarray(rec["id_len"], dtype=np.int64) + 1
        ie = id_base + np.cumsum(id_lens)
        rows_all = np.stack([te - lens, te, ie - id_lens, ie], axis=1)
        for code in range(len(SPLITS)):
            sel = np.flatnonzero(fin == code)
            if not sel.size:
                continue
            hist[code] = _add_hist(hist[code], np.bincount(lens[sel]))
            pending[code].append(rows_all[sel])
            n_pending[code] += sel.size
            if n_pending[code] >= size:
                flush(code, last=False)
        tok_base, id_base = int(te[-1]), int(ie[-1])
    for code in range(len(SPLITS)):
        if n_pending[code]:
            flush(code, last=True)
    if ids_mm is not None:
        ids_mm.close()
    return {"shards": shards, "hist": {s: h.tolist() for s, h in zip(SPLITS, hist)}}


def _unit_job(args):
    kind, cfg, u, extra = args
    if kind == "stage1":
        return run_unit(cfg, u, resume=extra, position=u)
    return write_unit_shards(cfg, u, extra)


def _sources_job(args) -> list[dict]:
    """sha256 (and size) of the input files, for the manifest."""
    return [_source(p) for p in args]


def _serve(conn) -> None:
    """Loop of a worker process: run ``(index, fn, args)`` messages until ``None``; answer
    ``(index, True, result)`` or ``(index, False, exception)``."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        i, fn, args = msg
        try:
            reply = (i, True, fn(args))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            reply = (i, False, e)
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result or exception
            what = f"{type(reply[2]).__name__}: {reply[2]}"[:500]
            conn.send((i, False, IngestError(f"an ingest worker could not send back {what} ({e!r})")))


def _send_in_order(conn, outbox: queue.SimpleQueue) -> None:
    """Send ``outbox``'s messages to one worker, in order, until ``None`` (sent too). In a thread:
    a large message (a big unit's final codes) blocks until the worker reads it, which a busy
    worker does only when its current job is done; the caller must not wait for that."""
    while True:
        msg = outbox.get()
        try:
            conn.send(msg)
        except OSError:  # the worker is gone; the caller learns it from the connection
            return
        if msg is None:
            return


class _Workers:
    """``workers`` processes for lists of unit jobs, forked once and used for stage 1, hashing the
    inputs and stage 3. The calling process runs the first job itself and ``workers - 1`` forked
    processes the others (when there are as many jobs as workers: the common case, and one fork
    fewer); otherwise ``workers`` processes take the jobs as they become free.

    A plain process per worker with a pipe (and a thread that feeds it), not
    ``multiprocessing.Pool``: the pool's start (queues, locks, three handler threads) and teardown
    took ~20 ms, all of it serial time that showed directly in the 2-worker speedup.
    """

    def __init__(self, workers: int, n_jobs: int):
        self.main_too = workers > 1 and n_jobs == workers
        size = workers - 1 if self.main_too else workers
        self.procs: list[Any] = []
        self.conns: list[Any] = []  # the parent's end of each worker's pipe
        self._outbox: dict[Any, queue.SimpleQueue] = {}  # connection -> messages to send
        self._senders: list[threading.Thread] = []
        self._pending: dict[int, Any] = {}  # sent job id -> its connection (no answer yet)
        self._done: dict[int, tuple[bool, Any]] = {}
        self._next_id = 0
        self._deferred: list[tuple[Callable, Any, dict]] = []
        self._stopped: set[Any] = set()
        if workers > 1 and n_jobs > 1 and size >= 1:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            for k in range(min(size, n_jobs)):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(child,), name=f"ingest-worker-{k + 1}", daemon=True)
                proc.start()
                child.close()
                outbox: queue.SimpleQueue = queue.SimpleQueue()
                sender = threading.Thread(target=_send_in_order, args=(parent, outbox), daemon=True)
                sender.start()
                self.procs.append(proc)
                self.conns.append(parent)
                self._outbox[parent] = outbox
                self._senders.append(sender)

    def _send(self, conn, fn, args) -> int:
        i = self._next_id
        self._next_id += 1
        self._pending[i] = conn
        self._outbox[conn].put((i, fn, args))
        return i

    def _collect(self, conns) -> None:
        """Receive one reply from each ready connection among ``conns``."""
        for conn in mp_connection.wait(conns):
            try:
                i, ok, value = conn.recv()
            except EOFError:
                raise IngestError(
                    "an ingest worker process died (killed, or out of memory?); run again with "
                    "resume=true to continue from the last checkpoint"
                ) from None
            del self._pending[i]
            self._done[i] = (ok, value)

    def _result(self, i: int):
        while i not in self._done:
            self._collect([self._pending[i]])
        ok, value = self._done.pop(i)
        if not ok:
            raise value
        return value

    def defer(self, fn, args) -> Callable[[], Any]:
        """Queue ``fn(args)`` to run right after the last job of the next :meth:`map`, on the worker
        process that gets that job: it fills the time that worker would wait for the others (with
        no worker process: in a thread, once that map is done). Returns a function that waits for
        the result."""
        box: dict[str, Callable[[], Any]] = {}
        self._deferred.append((fn, args, box))

        def result():
            if "result" not in box:
                raise RuntimeError("a deferred job runs after the next map(); none has run yet")
            return box["result"]()

        return result

    def _start_deferred(self, conn) -> None:
        for fn, args, box in self._deferred:
            if conn is None:
                thread = ThreadPoolExecutor(1, thread_name_prefix=getattr(fn, "__name__", "job"))
                box["result"] = thread.submit(fn, args).result
                thread.shutdown(wait=False)
            else:
                box["result"] = functools.partial(self._result, self._send(conn, fn, args))
        self._deferred = []

    def map(self, jobs: list) -> list:
        if not self.procs:
            results = [_unit_job(j) for j in jobs]
            self._start_deferred(None)
            return results
        results: list[Any] = [None] * len(jobs)
        todo = list(range(1 if self.main_too else 0, len(jobs)))
        mine: dict[int, tuple[int, Any]] = {}  # sent id -> (job index, connection)
        load = {c: 0 for c in self.conns}  # this map's jobs on each worker: one at a time (balance)

        def hand_out() -> None:
            for conn in self.conns:
                if todo and not load[conn]:
                    k = todo.pop(0)
                    mine[self._send(conn, _unit_job, jobs[k])] = (k, conn)
                    load[conn] += 1
                    if not todo:  # the last job: the deferred ones queue behind it
                        self._start_deferred(conn)

        hand_out()
        self._start_deferred(self.conns[0])  # (when this map had no job for the workers)
        if self.main_too:
            results[0] = _unit_job(jobs[0])
        while mine:
            self._collect(list(set(self._pending.values())))
            for i in [i for i in mine if i in self._done]:
                k, conn = mine.pop(i)
                load[conn] -= 1
                results[k] = self._result(i)
            hand_out()
        return results

    def stop(self) -> None:
        """Ask the idle workers to exit, without waiting: they exit while the caller finishes
        (the manifest), and :meth:`close` then finds them gone."""
        busy = set(self._pending.values())
        for conn in self.conns:
            if conn not in busy and conn not in self._stopped:
                self._outbox[conn].put(None)
                self._stopped.add(conn)

    def close(self) -> None:
        """Stop the workers (terminate the busy ones: after an error) and wait for them."""
        busy = set(self._pending.values())
        for proc, conn in zip(self.procs, self.conns):
            if conn in busy:
                proc.terminate()
                self._pending = {i: c for i, c in self._pending.items() if c is not conn}
        self.stop()
        for thread in self._senders:
            thread.join()
        for proc, conn in zip(self.procs, self.conns):
            proc.join()
            conn.close()
        self.procs, self.conns, self._senders = [], [], []


# ============================================================================ output dir
# names an ingest may find in its output dir: its own outputs and the multirun/SLURM log folder
_OURS = {MANIFEST_NAME, REJECTS_NAME, CONFIG_NAME, WORK_DIR, SLURM_LOG_DIR, *SPLITS}


def _clean_output(out: Path) -> None:
    """Remove what an ingest writes (never anything else)."""
    for name in (MANIFEST_NAME, REJECTS_NAME, CONFIG_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    for split in SPLITS:
        d = out / split
        if d.is_dir():
            for p in d.glob("*.h5*"):
                p.unlink()
            try:
                d.rmdir()
            except OSError:
                pass


def _remove_partial_files(out: Path) -> None:
    """Remove the temporary files a killed run left (``<name>.tmp-<pid>``: a shard, the manifest or
    rejects.tsv being written); they were never renamed, so nothing lists or reads them."""
    for p in [*out.glob("*.tmp-*"), *out.glob(f"{REJECTS_NAME}.tmp"), *(q for s in SPLITS for q in out.glob(f"{s}/*.tmp-*"))]:
        if p.is_file():
            log.info("removing %s (left by an interrupted run)", p)
            p.unlink(missing_ok=True)


def _prepare_output(cfg: dict, parts_mode: bool) -> None:
    out = Path(cfg["output_dir"])
    for above in (out, *out.parents):  # a file where the directory (or one above it) should be
        if above.exists() and not above.is_dir():
            raise IngestError(
                f"output_dir {out}: {above} is a file, not a directory; choose a directory (new or empty) for the shards"
            )
        if above.exists():
            break
    fp = _fingerprint(cfg)
    cfg_path = out / CONFIG_NAME
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            if not cfg["overwrite"] or parts_mode:
                raise IngestError(
                    f"{out} holds an ingest made with a different config (differs in: {', '.join(diff)}). "
                    "Choose another output_dir, or pass overwrite=true to replace it"
                    + (" (run without part= to do so)." if parts_mode else ".")
                )
            log.warning("overwrite=true: removing the previous ingest in %s", out)
            _clean_output(out)
        elif not cfg["resume"] and not parts_mode:
            _clean_output(out)
    elif out.is_dir() and any(p.name not in _OURS for p in out.iterdir()):
        if not cfg["overwrite"]:
            raise IngestError(
                f"{out} is not empty and holds no {CONFIG_NAME}: refusing to write into it. "
                "Choose an empty or new output_dir, or pass overwrite=true (only files an ingest writes are removed)."
            )
        _clean_output(out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg_path.is_file():
        _atomic_json(cfg_path, fp)


# ============================================================================ public API
def ingest(cfg: Any = None, **overrides) -> dict:
    """Run an ingest (or one part, or the merge) and return the manifest (a part returns its summary).

    ``cfg``: a dict or DictConfig with the keys of conf/ingest.yaml; ``overrides`` win over it.
    """
    c = resolve_config(cfg, **overrides)
    try:
        return _ingest(c)
    except OSError as e:
        if not _is_disk_full(e):
            raise
        raise IngestError(
            f"{c['output_dir']}: no space left on the device (or the file size limit was reached) while ingesting "
            f"({' '.join(str(e).split())[:200]}). Nothing is marked complete: free space (the work files need about "
            "the size of the FASTA, the shards about half of it), then rerun the same command with resume=true"
        ) from e


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _is_disk_full(e: OSError) -> bool:
    """A full disk or a file-size limit, from Python (errno) or from HDF5 (only in the message)."""
    if e.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(e)
    return any(f"errno = {n}," in text for n in _DISK_FULL_ERRNOS) or any(
        os.strerror(n) in text for n in _DISK_FULL_ERRNOS
    )


def _ingest(c: dict) -> dict:
    if c["merge"]:
        return merge(c["output_dir"], workers=int(c["workers"]), progress=c["progress"])
    parts_mode = c["part"] is not None
    _prepare_output(c, parts_mode)
    out = Path(c["output_dir"])
    if c["resume"] and not parts_mode and (out / MANIFEST_NAME).is_file():
        # the manifest is written last, after every shard: the ingest is complete (a kill may have
        # come while the work files were removed: finish that)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IngestError(
                f"{out / MANIFEST_NAME}: written by another format version ({manifest.get('format_version')!r}, "
                f"this is {FORMAT_VERSION}); rerun without resume=true to ingest again (overwrite=true if asked)"
            )
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        log.info("resume=true: %s is already complete", out)
        return manifest
    if parts_mode:
        if c["num_parts"] is None:
            raise IngestError("part=i needs num_parts=n (the total number of parts)")
        part = int(c["part"])
        if not 0 <= part < len(c["units"]):
            raise IngestError(f"part={part} out of range for num_parts={c['num_parts']}")
        return run_unit(c, part, resume=c["resume"])
    jobs = [("stage1", c, u, c["resume"]) for u in range(len(c["units"]))]
    pool = _Workers(int(c["workers"]), len(jobs))  # the same processes for stage 1 and stage 3
    # sha256 of the inputs for the manifest: queued behind the last stage-1 unit of a worker
    # process (the main process has its own unit), or in a thread after stage 1 with one worker.
    # Either way it runs while a core would otherwise wait for the other units or the serial
    # resolve step, instead of taking CPU from stage 1.
    sources = pool.defer(_sources_job, c["input"])
    try:
        t0 = time.perf_counter()
        pool.map(jobs)
        log.info("stage 1 (%d units, %d workers): %.2fs", len(jobs), int(c["workers"]), time.perf_counter() - t0)
        return merge(
            c["output_dir"], workers=int(c["workers"]), progress=c["progress"], _cfg=c, _pool=pool, _sources=sources
        )
    finally:
        pool.close()


def merge(
    output_dir: str | os.PathLike,
    workers: int = 1,
    progress: bool = True,
    _cfg: dict | None = None,
    _pool=None,
    _sources: Callable[[], list[dict]] | None = None,
) -> dict:
    """Resolve dedup and id conflicts over all units, write the shards and the manifest."""
    out = Path(output_dir).absolute()
    cfg_path = out / CONFIG_NAME
    if not cfg_path.is_file():
        raise IngestError(f"{out}: no {CONFIG_NAME}; nothing to merge (run the parts first: part=i num_parts=n)")
    fp = json.loads(cfg_path.read_text())
    cfg = dict(_cfg) if _cfg else {**default_config(), **fp, "output_dir": str(out), "progress": progress}
    n_units = len(fp["units"])
    missing = [u for u in range(n_units) if not (_unit_dir(out, u) / "done.json").is_file()]
    if missing and (out / MANIFEST_NAME).is_file() and not (out / WORK_DIR).exists():
        return json.loads((out / MANIFEST_NAME).read_text())
    if missing:
        raise IngestError(
            f"{out}: parts {missing} of {n_units} have not finished; run them (part=i num_parts={n_units}, "
            "resume=true continues an interrupted part), then merge again"
        )
    summaries = [json.loads((_unit_dir(out, u) / "done.json").read_text()) for u in range(n_units)]
    t0 = time.perf_counter()
    final, conflicts = _resolve(out, n_units, float(cfg.get("merge_memory_mb") or 256))
    log.info("resolved dedup over %d records in %.2fs", sum(len(f) for f in final), time.perf_counter() - t0)

    # rejects: stage-1 rejects (lines made absolute) + id conflicts, in input order
    rejects = []
    bases: dict[int, int] = {}

    def base_of(u: int) -> int:
        """Lines of unit u are counted from its first record: the number of lines before it."""
        if u not in bases:
            lb = summaries[u]["line_base"]
            if lb is None:  # only counted when needed (it reads the file up to the unit's start)
                first = json.loads((_unit_dir(out, u) / "checkpoint.json").read_text())["first_offset"]
                lb = count_newlines(fp["input"][fp["units"][u]["file"]], first) if first else 0
            bases[u] = lb
        return bases[u]

    for u, s in enumerate(summaries):
        unit = fp["units"][u]
        with open(_unit_dir(out, u) / "rejects.tsv", encoding="utf-8") as fh:
            for row in fh:
                f = row.rstrip("\n").split("\t", 4)
                rejects.append((unit["file"], int(f[1]) + base_of(u), f[0], f[2], f[3], f[4]))
    if any(conflicts):
        recs = [_load_records(_unit_dir(out, u)) for u in range(n_units)]
        sizes = np.array([len(r) for r in recs])
        base = np.concatenate([[0], np.cumsum(sizes)])
        id_cache: dict[int, tuple[bytes, np.ndarray]] = {}

        def id_of(u, i):
            if u not in id_cache:
                blob = (_unit_dir(out, u) / "ids.bin").read_bytes()
                id_cache[u] = (blob, np.concatenate([[0], np.cumsum(np.asarray(recs[u]["id_len"], np.int64) + 1)]))
            blob, io_ = id_cache[u]
            return _tsv(decode_header(blob[io_[i] : io_[i + 1] - 1]))

        for u, lst in enumerate(conflicts):
            unit = fp["units"][u]
            fname = Path(fp["input"][unit["file"]]).name
            for i, g0 in lst:
                u0 = int(np.searchsorted(base, g0, side="right") - 1)
                i0 = g0 - int(base[u0])
                l0 = int(recs[u0]["line"][i0]) + base_of(u0)
                f0 = Path(fp["input"][fp["units"][u0]["file"]]).name
                line = int(recs[u]["line"][i]) + base_of(u)
                rid = id_of(u, i)
                detail = f"id first seen with a different sequence at {f0}:{l0}"
                if fp["strict"]:
                    raise IngestError(
                        f"{fp['input'][unit['file']]}:{line}: record {rid!r} rejected: duplicate_id_conflict "
                        f"({detail}). Fix the ids, or run with strict=false to skip and list such records."
                    )
                rejects.append((unit["file"], line, fname, rid, "duplicate_id_conflict", detail))
    rejects.sort(key=lambda r: (r[0], r[1]))

    _remove_partial_files(out)
    jobs = [("stage3", cfg, u, final[u]) for u in range(n_units)]
    t1 = time.perf_counter()
    if _pool is None:
        pool = _Workers(workers, n_units)
        try:
            results = pool.map(jobs)
        finally:
            pool.close()
    else:
        results = _pool.map(jobs)
        _pool.stop()

    log.info("stage 3 (shards): %.2fs", time.perf_counter() - t1)
    # manifest
    tok = Tokenizer()
    splits = {}
    for split in SPLITS:
        shards = [s for r in results for s in r["shards"][split]]
        hists = [np.asarray(r["hist"][split], dtype=np.int64) for r in results if r["hist"][split]]
        hist = np.zeros(max((h.size for h in hists), default=0), dtype=np.int64)
        for h in hists:
            hist[: h.size] += h
        splits[split] = {
            "n_sequences": int(hist.sum()),
            "n_residues": int((hist * np.arange(hist.size)).sum()),
            "length": _length_stats(hist),
            "shards": shards,
        }
    rejected = Counter()
    for s in summaries:
        rejected.update(s["rejected"])
    rejected["duplicate_id_conflict"] += sum(len(c) for c in conflicts)
    rejected = {k: int(v) for k, v in rejected.items() if v}
    n_records = sum(s["n_records"] for s in summaries)
    n_unique = sum(int((f >= 0).sum()) for f in final)
    n_dup = sum(int((f == -1).sum()) for f in final)
    with open(out / f"{REJECTS_NAME}.tmp", "w", encoding="utf-8") as fh:
        fh.write("file\tline\tid\treason\tdetail\n")
        for _, line, fname, rid, reason, detail in rejects:
            fh.write(f"{fname}\t{line}\t{rid}\t{reason}\t{detail}\n")
    os.replace(out / f"{REJECTS_NAME}.tmp", out / REJECTS_NAME)
    if n_unique == 0:  # nothing to train on: no manifest (no reader takes this for a dataset)
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        (out / CONFIG_NAME).unlink(missing_ok=True)  # not an interrupted ingest either: nothing to resume
        what = ", ".join(f"{v} {k}" for k, v in rejected.items()) or "none"
        raise IngestError(
            f"{', '.join(fp['input'])}: no valid record: all {n_records} records were rejected ({what}); each is "
            f"listed with its line in {out / REJECTS_NAME}. Check that this is a protein FASTA file and the "
            "min_length/max_length filter; no shards were written"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "vocab": tok.vocab(),
        "config": {k: cfg.get(k) for k in sorted(set(fp) | {"workers", "block_size", "merge_memory_mb"})},
        "sources": _sources() if _sources is not None else _sources_job(fp["input"]),
        "splits": splits,
        "n_records": n_records,
        "n_unique": n_unique,
        "n_duplicates": n_dup,
        "rejected": rejected,
        "rejects_file": REJECTS_NAME,
        "length_filter": {"min": fp["min_length"], "max": fp["max_length"]},
        "ood_families": fp["ood_families"],
        "annotations": [_source(p) for p in fp["annotations"]],
        "split_hash": "splitmix64(blake2b-128(tokens)[:8] ^ salt(seed)) -> [0,1) vs cumulative fractions",
        "dedup": "blake2b-128 of the token bytes; first record in input order kept",
        "fractions": fp["fractions"],
        "seed": fp["seed"],
    }
    if n_records != n_unique + n_dup + sum(rejected.values()):
        raise IngestError(f"internal error: counts do not add up in {out}: please report")
    _atomic_json(out / MANIFEST_NAME, manifest)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    log.info(
        "ingest done: %d records, %d unique, %d duplicates, rejected %s; %s",
        n_records, n_unique, n_dup, rejected, {s: v["n_sequences"] for s, v in splits.items()},
    )  # fmt: skip
    return manifest


def _length_stats(hist: np.ndarray) -> dict:
    n = int(hist.sum())
    if n == 0:
        return {"min": None, "max": None, "mean": None, "median": None}
    nz = np.flatnonzero(hist)
    c = np.cumsum(hist)
    lo = int(np.searchsorted(c, (n - 1) // 2, side="right"))
    hi = int(np.searchsorted(c, n // 2, side="right"))
    return {
        "min": int(nz[0]),
        "max": int(nz[-1]),
        "mean": float((hist * np.arange(hist.size)).sum() / n),
        "median": (lo + hi) / 2,
    }


def _source(path: str) -> dict:
    """Path, sha256 and size of an input file (hashed from a memory map: no copy of the data)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    if size:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            h.update(data)
    return {"path": path, "sha256": h.hexdigest(), "bytes": size}


__all__ = [
    "FastaFormatError", "IngestError", "PAPER_OOD_FAMILIES", "SimulatedInterruption", "ingest", "load_ood_accessions", "merge",
    "parse_header", "plan_units", "resolve_config", "split_codes",
]  # fmt: skip
