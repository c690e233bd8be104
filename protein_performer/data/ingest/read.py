"""Stage 1, per work unit: parse, validate, tokenize and hash; append raw files; checkpoint.

For each block of the unit (``fasta.iter_batches``, sequences already token bytes) the valid
records go to the unit's raw files in ``_work/unit-NNNN/``: ``tokens.bin`` (the tokens, back to
back), ``records.bin`` (one ``REC`` per record: length, sequence hash, id key, line, hash split,
ood flag) and ``ids.bin`` (one id per line); invalid ones to ``rejects.tsv`` with their reason.
After every block ``checkpoint.json`` records where to resume (the input offset and line, and the
raw files' sizes); ``done.json`` marks the unit complete and holds its summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from protein_performer.data.fasta import (
    Batch,
    FastaFormatError,
    count_newlines,
    decode_header,
    find_record_start,
    iter_batches,
)
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.outputs import write_json

from .annotations import load_ood_accessions, records_with_family_token
from .common import REC, IngestError, SimulatedInterruption, unit_dir
from .config import IngestConfig, WorkUnit
from .hashing import blake2b_128, id_keys, split_codes

log = logging.getLogger(__name__)

STAR, BAD = 254, 255  # token bytes of '*' and of an invalid character (see token_table)
_STAR_BYTE, _BAD_BYTE = bytes([STAR]), bytes([BAD])
_UNIPROT_PREFIXES = (b"sp|", b"tr|")  # sp|ACC|NAME, tr|ACC|NAME: the id is ACC
_TSV_SAFE = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


class Reject(NamedTuple):
    """One row of a unit's rejects.tsv (``line`` counted from the unit's first record)."""

    file_name: str
    line: int
    record_id: str
    reason: str
    detail: str


@dataclass
class UnitProgress:
    """Where stage 1 of a unit stands; saved as ``checkpoint.json`` after every block."""

    offset: int  # input byte offset of the next record to read
    line: int = 1  # its header's line (counted from the unit's first record)
    first_offset: int | None = None  # offset of the unit's first record
    n_records: int = 0
    n_valid: int = 0
    n_residues: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    sizes: dict[str, int] = field(default_factory=dict)  # raw file name -> bytes written


@dataclass
class BatchContext:
    """What validating and hashing a batch needs besides the batch."""

    path: str
    unit: WorkUnit
    progress: UnitProgress  # (its first_offset makes a strict error's line absolute)
    ood_accessions: set[bytes]
    ood_tokens: set[bytes]
    min_length: int | None
    max_length: int | None
    seed: int
    fractions: dict
    strict: bool


class _UnitFiles:
    """The raw files of one unit, opened for appending (truncated to a checkpoint's sizes)."""

    names = ("tokens.bin", "records.bin", "ids.bin", "rejects.tsv")

    def __init__(self, folder: Path, sizes: dict | None):
        folder.mkdir(parents=True, exist_ok=True)
        self.handles = {}
        for name in self.names:
            path = folder / name
            if sizes is None:
                path.write_bytes(b"")
            else:
                with open(path, "ab") as fh:
                    fh.truncate(sizes[name])
            self.handles[name] = open(path, "ab")

    def append(self, tokens: np.ndarray, records: np.ndarray, ids_blob: bytes, rejects: list[Reject]) -> None:
        self.handles["tokens.bin"].write(tokens.data)
        self.handles["records.bin"].write(records.data)
        self.handles["ids.bin"].write(ids_blob)
        if rejects:
            self.handles["rejects.tsv"].write("".join("\t".join(map(str, r)) + "\n" for r in rejects).encode())

    def sizes(self) -> dict:
        for fh in self.handles.values():
            fh.flush()
        return {name: fh.tell() for name, fh in self.handles.items()}

    def close(self):
        for fh in self.handles.values():
            fh.close()


def run_unit(cfg: IngestConfig, u: int, resume: bool = False, position: int = 0) -> dict:
    """Stage 1 for work unit ``u``: parse, validate, tokenize and hash; write raw files + rejects."""
    unit = cfg.units[u]
    path = cfg.input[unit.file]
    folder = unit_dir(Path(cfg.output_dir), u)
    done = folder / "done.json"
    if resume and done.is_file():
        log.info("unit %d (%s) already complete: skipped", u, path)
        return json.loads(done.read_text())
    checkpoint_path = folder / "checkpoint.json"
    checkpoint = json.loads(checkpoint_path.read_text()) if (resume and checkpoint_path.is_file()) else None
    if checkpoint is None and folder.exists():
        shutil.rmtree(folder)
    files = _UnitFiles(folder, checkpoint["sizes"] if checkpoint else None)
    if checkpoint:
        progress = UnitProgress(**checkpoint)
        log.info("unit %d: resuming at byte %d (%d records done)", u, progress.offset, progress.n_records)
    else:
        progress = UnitProgress(offset=unit.start, sizes=files.sizes())
    table = token_table()
    ctx = BatchContext(
        path=path, unit=unit, progress=progress,
        ood_accessions=load_ood_accessions(cfg.annotations, cfg.ood_families),
        ood_tokens={f.encode() for f in cfg.ood_families if f.startswith("PF")},
        min_length=cfg.min_length, max_length=cfg.max_length, seed=cfg.seed, fractions=cfg.fractions,
        strict=cfg.strict,
    )  # fmt: skip
    bar = tqdm(
        desc=f"ingest {Path(path).name}" + (f" [{u}]" if len(cfg.units) > 1 else ""),
        unit=" seq", unit_scale=True, disable=not cfg.progress, position=position, leave=position == 0,
        initial=progress.n_records, mininterval=1.0,
    )  # fmt: skip
    try:
        _read_unit(cfg, ctx, table, files, checkpoint_path, bar)
    except FastaFormatError as e:
        if e.line is None or unit.start == 0:
            raise
        # a byte range counts its lines from its first record: make the line absolute
        first = find_record_start(path, unit.start)
        raise FastaFormatError(e.path, e.message, line=e.line + count_newlines(path, first)) from None
    finally:
        files.close()
        bar.close()
    summary = _unit_summary(u, unit, path, progress)
    write_json(done, summary, durable=False, indent=1)
    log.info("unit %d: %d records, %d valid, rejected %s", u, progress.n_records, progress.n_valid, progress.rejected)
    return summary


def _read_unit(
    cfg: IngestConfig, ctx: BatchContext, table: bytes, files: _UnitFiles, checkpoint_path: Path, bar
) -> None:
    """The block loop of stage 1: process, append, count, checkpoint."""
    progress, fail_after = ctx.progress, cfg.fail_after_records
    start_time, start_residues = time.perf_counter(), progress.n_residues
    batches = iter_batches(
        ctx.path, start=progress.offset, end=ctx.unit.end, line0=progress.line, block_size=cfg.block_size,
        table=table,
    )  # fmt: skip
    for batch in batches:
        if progress.first_offset is None and len(batch):
            progress.first_offset = batch.offsets[0]
        tokens, records, ids_blob, rejects = process_batch(batch, ctx)
        files.append(tokens, records, ids_blob, rejects)
        progress.n_records += len(batch)
        progress.n_valid += len(records)
        progress.n_residues += int(tokens.size)
        for reject in rejects:
            progress.rejected[reject.reason] = progress.rejected.get(reject.reason, 0) + 1
        if fail_after is not None and progress.n_records >= fail_after:
            raise SimulatedInterruption(f"fail_after_records={fail_after} reached (test hook)")
        progress.offset, progress.line = batch.end_offset, batch.end_line
        progress.sizes = files.sizes()
        write_json(checkpoint_path, asdict(progress), durable=False, indent=1)
        bar.update(len(batch))
        seconds = max(time.perf_counter() - start_time, 1e-9)
        bar.set_postfix_str(f"{(progress.n_residues - start_residues) / seconds / 1e6:.1f}M res/s", refresh=False)


def _unit_summary(u: int, unit: WorkUnit, path: str, progress: UnitProgress) -> dict:
    """done.json: the unit's counts, and ``line_base`` (lines before its first record; None: not
    counted, as it is only needed for rejects and reads the file up to the unit's start)."""
    line_base = 0
    if unit.start > 0 and progress.first_offset is not None:
        line_base = count_newlines(path, progress.first_offset) if progress.rejected else None
    return {
        "unit": u, "file": unit.file, "path": path, "n_records": progress.n_records,
        "n_valid": progress.n_valid, "n_residues": progress.n_residues, "rejected": progress.rejected,
        "line_base": line_base,
    }  # fmt: skip


def parse_header(header: bytes) -> tuple[bytes, bytes]:
    """(id, accession) from a header without '>': ``sp|ACC|NAME``/``tr|ACC|NAME`` -> ACC,
    ``UniRef50_ACC`` -> id ``UniRef50_ACC``, accession ``ACC``; otherwise the first word."""
    words = header.split(None, 1)
    word = words[0] if words else b""
    if word[:3] in _UNIPROT_PREFIXES:
        fields = word.split(b"|")
        return fields[1], fields[1]
    if word[:6] == b"UniRef":
        return word, word.partition(b"_")[2]
    return word, word


def token_table() -> bytes:
    """bytes.translate table: residue letters (either case) -> token ids, '*' -> STAR, else BAD."""
    table = Tokenizer()._encode_table.copy()  # invalid -> 255
    table[ord("*")] = STAR
    return table.tobytes()


def tsv_field(text: str) -> str:
    """A field of rejects.tsv: no tab or line break inside (an id never has one; be safe)."""
    return text.translate(_TSV_SAFE) if ("\t" in text or "\r" in text or "\n" in text) else text


def _reject_error(ctx: BatchContext, reject: Reject) -> IngestError:
    line = reject.line
    if ctx.unit.start > 0:  # lines are counted from the unit's first record: make them absolute
        line = count_newlines(ctx.path, ctx.progress.first_offset) + line
    return IngestError(
        f"{ctx.path}:{line}: record {reject.record_id!r} rejected: {reject.reason} ({reject.detail}). Fix the record, "
        "or run with strict=false to skip such records (they are counted in the manifest and listed in rejects.tsv)."
    )


@dataclass
class _BatchRecords:
    """A batch's records as parallel lists, narrowed as records are rejected."""

    headers: list[bytes]
    sequences: list[bytes]  # token bytes, a trailing '*' removed
    lines: list[int]
    words: list[bytes]  # first word of each header
    ids: list[bytes]
    joined: bytes | None  # b"".join(sequences) while no record was dropped (saves a join)

    def keep(self, indices: list[int]) -> None:
        """Keep only the records ``indices`` (in order)."""
        for name in ("headers", "sequences", "lines", "words", "ids"):
            column = getattr(self, name)
            setattr(self, name, [column[i] for i in indices])
        self.joined = None


def _batch_records(batch: Batch) -> _BatchRecords:
    headers = batch.headers
    words = [h.partition(b" ")[0] for h in headers]  # first word, fast path
    if not all(words) or (b"\t" in batch.block and any(b"\t" in w for w in words)):
        words = [(h.split(None, 1) or (b"",))[0] for h in headers]
    ids = [w.split(b"|")[1] if w[:3] in _UNIPROT_PREFIXES else w for w in words]
    sequences = batch.sequences
    joined = b"".join(sequences)
    if _STAR_BYTE in joined:  # strip one trailing stop symbol
        sequences = [s[:-1] if s[-1:] == _STAR_BYTE else s for s in sequences]
        joined = b"".join(sequences)
    return _BatchRecords(headers, sequences, batch.lines, words, ids, joined)


def process_batch(batch: Batch, ctx: BatchContext) -> tuple[np.ndarray, np.ndarray, bytes, list[Reject]]:
    """Validate and hash one batch whose sequences are already token bytes (see token_table).

    Returns tokens, REC records, the ids blob (one id per line) and the reject rows. The common
    case (no defect in the batch) is a few list comprehensions over C-level bytes methods; the
    per-record checks run only for a batch that holds a defect.
    """
    file_name = Path(ctx.path).name
    records = _batch_records(batch)
    joined = records.joined
    rejects: list[Reject] = []
    if _BAD_BYTE in joined or _STAR_BYTE in joined or not all(records.sequences) or not all(records.ids):
        rejects += _reject_defects(batch, records, file_name)
    if ctx.min_length is not None or ctx.max_length is not None:
        rejects += _reject_by_length(records, ctx.min_length, ctx.max_length, file_name)
    if rejects:
        rejects.sort(key=lambda r: r.line)
        if ctx.strict:  # the first bad record of the batch, by line
            raise _reject_error(ctx, rejects[0])
    return (*_hash_records(records, ctx), rejects)


def _reject_defects(batch: Batch, records: _BatchRecords, file_name: str) -> list[Reject]:
    """Reject records with no sequence line, no id, no residue or an invalid character."""
    rejects, kept = [], []
    for i, (sequence, record_id) in enumerate(zip(records.sequences, records.ids)):
        if not batch.sequences[i]:
            reason, detail = "header_only", "a header line with no sequence line after it"
        elif not record_id:
            reason, detail = "missing_id", "empty header line"
        elif not sequence:
            reason, detail = "empty_sequence", "the sequence lines hold no residue"
        elif _BAD_BYTE in sequence or _STAR_BYTE in sequence:
            pos = min(j for j in (sequence.find(_BAD_BYTE), sequence.find(_STAR_BYTE)) if j >= 0)
            char = batch.raw_sequence(i)[pos]
            what = f"character {chr(char)!r}" if char < 128 else f"non-ASCII byte 0x{char:02x}"
            reason, detail = "invalid_character", f"{what} at residue {pos + 1}"
        else:
            kept.append(i)
            continue
        rejects.append(Reject(file_name, records.lines[i], tsv_field(decode_header(record_id)), reason, detail))
    records.keep(kept)
    return rejects


def _reject_by_length(records: _BatchRecords, min_length: int | None, max_length: int | None, file_name: str):
    """Reject records shorter than ``min_length`` or longer than ``max_length`` residues."""
    rejects, kept = [], []
    for i, sequence in enumerate(records.sequences):
        length = len(sequence)
        if min_length is not None and length < min_length:
            reason, detail = "too_short", f"length {length} < min_length {min_length}"
        elif max_length is not None and length > max_length:
            reason, detail = "too_long", f"length {length} > max_length {max_length}"
        else:
            kept.append(i)
            continue
        rejects.append(Reject(file_name, records.lines[i], tsv_field(decode_header(records.ids[i])), reason, detail))
    if len(kept) < len(records.sequences):
        records.keep(kept)
    return rejects


def _hash_records(records: _BatchRecords, ctx: BatchContext) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Tokens, REC records and ids blob of the kept records: hashes, id keys, splits, ood flags."""
    sequences, ids = records.sequences, records.ids
    n = len(sequences)
    recs = np.zeros(n, dtype=REC)
    if not n:
        return np.zeros(0, np.uint8), recs, b""
    if ctx.ood_accessions:
        accessions = (w.partition(b"_")[2] if w[:6] == b"UniRef" else rid for w, rid in zip(records.words, ids))
        recs["ood"] = [
            acc in ctx.ood_accessions or (b"." in acc and acc.split(b".")[0] in ctx.ood_accessions)
            for acc in accessions
        ]
    if ctx.ood_tokens:
        recs["ood"][records_with_family_token(records.headers, ctx.ood_tokens)] = 1
    recs["length"] = list(map(len, sequences))
    recs["seq"] = np.frombuffer(b"".join([blake2b_128(s).digest() for s in sequences]), "<u8").reshape(n, 2)
    recs["id_len"] = list(map(len, ids))
    recs["idh"] = id_keys(ids, recs["id_len"])
    recs["line"] = records.lines
    recs["hsplit"] = split_codes(recs["seq"][:, 0], ctx.seed, ctx.fractions)
    joined = b"".join(sequences) if records.joined is None else records.joined
    tokens = np.frombuffer(joined, dtype=np.uint8)
    return tokens, recs, b"\n".join(ids) + b"\n"
