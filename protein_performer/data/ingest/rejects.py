"""rejects.tsv: every rejected record with its file, absolute line, id, reason and detail.

Stage 1 writes each unit's rejects with lines counted from the unit's first record; the merge
makes the lines absolute, adds the id conflicts found by the resolve step, sorts all of them in
input order and writes ``<output_dir>/rejects.tsv`` (atomically). With ``strict=true`` an id
conflict stops the merge instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from protein_performer.data.fasta import count_newlines, decode_header
from protein_performer.outputs import atomic_output

from .common import REJECTS_NAME, IngestError, load_records, unit_dir
from .config import IngestConfig
from .read import tsv_field

ID_CONFLICT = "duplicate_id_conflict"
_HEADER = "file\tline\tid\treason\tdetail\n"


class MergedReject(NamedTuple):
    """One row of rejects.tsv; ``file_index`` and ``line`` give its place in the input."""

    file_index: int
    line: int
    file_name: str
    record_id: str
    reason: str
    detail: str


class _LineBases:
    """The number of lines before each unit's first record (a unit counts its lines from there)."""

    def __init__(self, out: Path, cfg: IngestConfig, summaries: list[dict]):
        self.out, self.cfg, self.summaries = out, cfg, summaries
        self.bases: dict[int, int] = {}

    def __call__(self, u: int) -> int:
        if u not in self.bases:
            base = self.summaries[u]["line_base"]
            if base is None:  # only counted when needed (it reads the file up to the unit's start)
                first = json.loads((unit_dir(self.out, u) / "checkpoint.json").read_text())["first_offset"]
                path = self.cfg.input[self.cfg.units[u].file]
                base = count_newlines(path, first) if first else 0
            self.bases[u] = base
        return self.bases[u]


class _UnitIds:
    """The id of record ``i`` of unit ``u``, as rejects.tsv writes it (from the unit's ids.bin)."""

    def __init__(self, out: Path, units: list[np.ndarray]):
        self.out, self.units = out, units
        self.cache: dict[int, tuple[bytes, np.ndarray]] = {}

    def __call__(self, u: int, i: int) -> str:
        if u not in self.cache:
            blob = (unit_dir(self.out, u) / "ids.bin").read_bytes()
            with_newlines = np.asarray(self.units[u]["id_len"], np.int64) + 1
            self.cache[u] = (blob, np.concatenate([[0], np.cumsum(with_newlines)]))
        blob, starts = self.cache[u]
        return tsv_field(decode_header(blob[starts[i] : starts[i + 1] - 1]))


def collect_rejects(out: Path, cfg: IngestConfig, summaries: list[dict], conflicts: list[list[tuple[int, int]]]):
    """The rows of rejects.tsv in input order: stage 1's, then the id conflicts, sorted by place."""
    line_base = _LineBases(out, cfg, summaries)
    rejects = _stage1_rejects(out, cfg, line_base)
    if any(conflicts):
        rejects += _conflict_rejects(out, cfg, conflicts, line_base)
    rejects.sort(key=lambda r: (r.file_index, r.line))
    return rejects


def _stage1_rejects(out: Path, cfg: IngestConfig, line_base: _LineBases) -> list[MergedReject]:
    rejects = []
    for u, unit in enumerate(cfg.units):
        with open(unit_dir(out, u) / "rejects.tsv", encoding="utf-8") as fh:
            for row in fh:
                file_name, line, record_id, reason, detail = row.rstrip("\n").split("\t", 4)
                rejects.append(MergedReject(unit.file, int(line) + line_base(u), file_name, record_id, reason, detail))
    return rejects


def _conflict_rejects(out: Path, cfg: IngestConfig, conflicts, line_base: _LineBases) -> list[MergedReject]:
    """A row per id conflict, naming where the id was first seen (``strict``: an error instead)."""
    inputs, units = cfg.input, cfg.units
    records = [load_records(unit_dir(out, u)) for u in range(len(units))]
    base = np.concatenate([[0], np.cumsum(np.array([len(r) for r in records]))])
    id_of = _UnitIds(out, records)
    rejects = []
    for u, unit_conflicts in enumerate(conflicts):
        file_index = units[u].file
        for i, first_index in unit_conflicts:
            first_unit = int(np.searchsorted(base, first_index, side="right") - 1)
            first_line = int(records[first_unit]["line"][first_index - int(base[first_unit])]) + line_base(first_unit)
            first_file = Path(inputs[units[first_unit].file]).name
            line = int(records[u]["line"][i]) + line_base(u)
            record_id = id_of(u, i)
            detail = f"id first seen with a different sequence at {first_file}:{first_line}"
            if cfg.strict:
                raise IngestError(
                    f"{inputs[file_index]}:{line}: record {record_id!r} rejected: {ID_CONFLICT} "
                    f"({detail}). Fix the ids, or run with strict=false to skip and list such records."
                )
            rejects.append(
                MergedReject(file_index, line, Path(inputs[file_index]).name, record_id, ID_CONFLICT, detail)
            )
    return rejects


def write_rejects(out: Path, rejects: list[MergedReject]) -> None:
    """``<out>/rejects.tsv``: a header line, then one tab-separated row per reject."""
    with atomic_output(out / REJECTS_NAME, durable=False) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(_HEADER)
        for reject in rejects:
            fh.write(f"{reject.file_name}\t{reject.line}\t{reject.record_id}\t{reject.reason}\t{reject.detail}\n")
