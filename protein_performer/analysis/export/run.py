"""Export, the run: sequences through the model, one record at a time, into ``<output>.partial``
(maps layout), renamed onto ``output`` when complete.

Memory is bounded per sequence: sequences go through the model one at a time (no padding), and
each layer's maps are computed in row tiles from its features (:mod:`~protein_performer.analysis.export.tiles`: the selected
layers and heads, dense maps, head-mean APC maps, top pairs) before the next layer runs.

Crash safety: the partial file carries the maps format's ``incomplete`` marker, so ``output`` is either
the previous file or the new complete one. After every record the partial file is flushed and a
line is added to its journal (:mod:`~protein_performer.analysis.export.journal`). ``resume=True`` continues a killed export:
the records the journal lists are checked against their CRC-32s and copied into a fresh partial
file with the same HDF5 calls in the same order (it then replaces the old one), the input is read
from the start with those records skipped, and the rest is computed. The result is byte-identical
to an uninterrupted export (tests/reliability/test_crash_export.py). A damaged record (killed mid-flush) is
recomputed from there on. The settings (model, checkpoint, include, crop, input) must be the
same; without ``resume`` an interrupted export is refused unless ``overwrite=True``. A failure
other than a bad input keeps the partial file for ``resume``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from protein_performer.analysis import rerun
from protein_performer.analysis.export.inputs import (
    CROPS,
    InputReport,
    SequenceRecord,
    crop_window,
    input_key,
    is_structure_input,
    parse_include,
    read_sequences,
)
from protein_performer.analysis.export.journal import (
    RESUME_SUFFIX,
    ExportJournal,
    Interrupted,
    find_interrupted,
    intact_record,
    partial_paths,
)
from protein_performer.analysis.export.model import ExportError
from protein_performer.analysis.export.output import (
    NoSpaceError,
    check_output,
    ensure_room,
    no_space_message,
    record_bytes,
    space_problem,
)
from protein_performer.analysis.export.summary import ExportCounts, ExportSummary
from protein_performer.analysis.export.tiles import MapSelection, dense_rows, extra_bytes, extras, write_record
from protein_performer.analysis.maps.format import EXTRA_DATASETS, INCOMPLETE_ATTR, MAP_DATASETS
from protein_performer.analysis.maps.writer import MapsWriter
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import MissingFileError, first_line
from protein_performer.model.performer import PerformerLM
from protein_performer.outputs_h5 import SETTINGS_ATTR, ResumableH5, settings_json
from protein_performer.pretrained import LoadedModel, load_model

log = logging.getLogger(__name__)


class _ExportRun:
    """One export in progress: the writer and journal of the target file, the records kept from
    an interrupted export, the counts. :meth:`add` handles one input record."""

    def __init__(
        self,
        lm: PerformerLM,
        run: ResumableH5,
        inc: tuple[str, ...],
        crop: str,
        interrupted: Interrupted,
        sel: MapSelection,
    ):
        cfg = lm.config
        self.lm, self.run, self.output, self.inc, self.crop = lm, run, run.output, inc, crop
        self.interrupted, self.sel = interrupted, sel
        self.causal = bool(cfg.causal)
        self.max_len = int(cfg.max_len)
        self.max_residues = self.max_len - Tokenizer.special_tokens(self.causal)
        if cfg.positions == "rotary" and cfg.qk == "content":  # no learned positions: any length runs whole
            self.max_residues = np.iinfo(np.int64).max
        self.depth, self.heads, self.dim = len(lm.blocks), int(cfg.heads), int(cfg.dim)
        self.partial, self.journal_path = partial_paths(self.output)
        resumed = interrupted.old is not None  # kept records are copied into a fresh file first
        self.target, self.target_journal = (
            partial_paths(self.output.with_name(self.output.name + RESUME_SUFFIX))
            if resumed
            else (self.partial, self.journal_path)
        )
        self.tok = Tokenizer(unknown="X")
        self.counts = ExportCounts()
        self.writer: MapsWriter | None = None
        self.journal: ExportJournal | None = None

    def open(self, settings: dict, sha: str) -> None:
        """Create the target file and its journal."""
        try:
            self.writer = MapsWriter(
                self.target, model_config=asdict(self.lm.config), checkpoint_sha256=sha, causal=self.causal
            )
            self.journal = ExportJournal(self.target_journal, settings)
        except OSError as e:
            if space_problem(e):
                raise
            raise ExportError(
                f"{self.target}: cannot be created ({first_line(e)}); choose a writable output path"
            ) from e

    def add(self, n: int, rec: SequenceRecord) -> bool:
        """Input record ``n``: kept from the interrupted export, or computed; False when skipped."""
        entry = self.interrupted.entry(n, rec.id)
        if entry is not None:
            if entry.get("skipped"):
                self._skip(rec.id)
                self.journal.add(entry)
                return False
            src = intact_record(self.interrupted.old, entry)
            if src is not None:
                self._copy(src, entry)
                return True
            log.warning(
                "%s: record %d (%s) was damaged by the interruption: computing from there on", self.partial, n, rec.id
            )
        self.caught_up()
        return self._compute(n, rec)

    def _skip(self, record_id: str) -> None:
        self.counts.skipped_too_long += 1
        self.counts.skipped.append(record_id)

    def _copy(self, src: h5py.Group, entry: dict) -> None:
        """Copy a kept record from the interrupted file, with the calls export wrote it with."""
        n_maps = sum(w in src for w in MAP_DATASETS)
        ensure_room(
            self.target,
            self.output,
            record_bytes(n_maps, self.depth, self.heads, len(src["tokens"]), self.dim, self.inc)
            + extra_bytes({w: {"shape": src[w].shape, "dtype": src[w].dtype} for w in EXTRA_DATASETS if w in src}),
        )
        copy = self.writer.copy_record(src)
        self.writer.flush()
        self.journal.add({**entry, "checksum": copy.checksum})
        self.counts.cropped += int("crop_start" in src.attrs)
        self.counts.records += 1
        self.counts.residues += copy.length
        self.counts.copied += 1

    def caught_up(self) -> None:
        """The copied records are in the new partial file: it (and its journal) replace the old."""
        if self.interrupted.old is None:
            return
        self.interrupted.close()
        os.replace(self.target, self.partial)
        os.replace(self.target_journal, self.journal_path)
        self.target, self.target_journal = self.partial, self.journal_path
        log.info("resume: %d records kept from the interrupted export, computing the rest", self.counts.copied)

    def _compute(self, n: int, rec: SequenceRecord) -> bool:
        """Run one record through the model into the file (cropped as ``crop`` says); False when skipped."""
        where = f"{rec.source or self.output.name} record {rec.id}"
        if not rec.sequence:
            raise ExportError(f"{where}: empty sequence")
        residues = self.tok.encode(rec.sequence)
        full_length = len(residues)
        window = crop_window(full_length, self.max_residues, self.crop, where)
        if window is None:
            self._skip(rec.id)
            self.journal.add({"n": n, "id": rec.id, "skipped": True})
            log.warning(
                "%s: %d residues > %d (max_len %d): skipped", where, full_length, self.max_residues, self.max_len
            )
            return False
        start, stop = window
        residues = residues[start:stop]
        cropped = stop - start != full_length
        n_maps = ("attentions" in self.inc) + ("apc" in self.inc)
        layers, heads = self.sel.resolve(self.depth, self.heads)
        tiled = extras(self.inc, self.sel, layers, heads, len(residues))
        need = record_bytes(n_maps, len(layers), len(heads), len(residues), self.dim, self.inc) + extra_bytes(tiled)
        ensure_room(self.target, self.output, need)
        attrs = {"crop_start": start, "full_length": full_length} if cropped else {}
        # the record is dropped on any error: no half-written record stays behind
        with self.writer.begin_layers(
            rec.id,
            self.tok.decode(residues),
            len(layers),
            len(heads),
            tokens=residues.astype(np.uint8),
            source=rec.source,
            attentions="attentions" in self.inc,
            apc="apc" in self.inc,
            attrs={**attrs, **self.sel.record_attrs(self.depth, self.heads)} or None,
            extras=tiled,
            rows=dense_rows(self.inc, self.sel, len(heads), len(residues)),
        ) as record:
            write_record(self.lm, record, residues, self.inc, self.sel)
        self.writer.flush()
        self.journal.add({"n": n, "id": rec.id, "group": record.name, "checksum": record.checksum})
        self.counts.cropped += int(cropped)
        self.counts.records += 1
        self.counts.residues += len(residues)
        return True

    def finish(self, meta: dict, failures: list[dict], settings: dict | None = None) -> None:
        """Record what the export did (and ``settings``: :mod:`rerun`'s ``run_settings``), close
        the file and rename it onto ``output``."""
        self.caught_up()
        if settings is not None:
            self.writer.set_attr(SETTINGS_ATTR, settings_json(settings))
        self.writer.set_attr(
            "export",
            json.dumps(
                {**meta, **self.counts.totals(), "skipped": self.counts.skipped, "input_failures": failures},
                default=str,
            ),
        )
        self.writer.close()
        self.run.publish()
        self.journal.close()
        self.journal_path.unlink(missing_ok=True)

    def abort(self, e: BaseException) -> BaseException | None:
        """Close everything after the error ``e``; returns the error to raise instead, if any. A bad
        input or setting removes the partial file; anything else keeps it for ``resume``."""
        if self.writer is not None:
            self.writer.abort()
        if self.journal is not None:
            self.journal.close()
        self.interrupted.close()
        if isinstance(e, NoSpaceError):  # stopped between records: the partial file is flushed and resumable
            return None
        if isinstance(e, ValueError) and not space_problem(e):  # a bad input or setting: nothing to resume
            for p in (self.target, self.target_journal):
                p.unlink(missing_ok=True)
            return None
        if space_problem(e):
            return ExportError(no_space_message(self.target, self.output))
        if self.target.exists():
            log.error(
                "export of %s interrupted after %d records (%s); rerun with resume=true to continue",
                self.output,
                self.counts.records,
                first_line(e),
            )
        return None


def _progress_bar(sequences: Iterable, max_sequences: int | None, progress: bool):
    """A tqdm bar over the records to export (None without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    total = len(sequences) if hasattr(sequences, "__len__") else None
    if max_sequences is not None:
        total = min(total, max_sequences) if total is not None else max_sequences
    return tqdm(total=total, desc="export", unit="seq", disable=not progress)


def export_attention(
    model: PerformerLM | LoadedModel,
    sequences: Iterable[SequenceRecord | tuple],
    output: str | Path,
    include: Sequence[str] = ("attentions", "apc"),
    crop: str = "error",
    max_sequences: int | None = None,
    checkpoint_sha256: str = "",
    metadata: dict | None = None,
    progress: bool = True,
    input_report: InputReport | None = None,
    resume: bool = False,
    overwrite: bool = False,
    input_key: Any = None,
    run_settings: dict | None = None,
    selection: MapSelection | dict | None = None,
) -> ExportSummary:
    """Write the maps (and embeddings) of ``sequences`` to the HDF5 file ``output`` (maps layout).

    ``sequences``: :class:`SequenceRecord` s or ``(id, sequence, source)`` tuples. ``include``:
    any of ``attentions`` (every layer x head, float16), ``apc`` (``apc(symmetrize(A))`` of each
    map, float16), ``mean`` and ``per_token`` (final-layer embeddings, float32), ``apc_mean`` and
    ``contacts`` (:mod:`~protein_performer.analysis.export.tiles`); ``selection``: their layers,
    heads, reduction and number of pairs (:class:`~protein_performer.analysis.export.tiles.MapSelection`,
    default: all layers and heads). ``input_report``: the reader's failures, stored in the
    ``export`` attribute. Returns an :class:`ExportSummary`.
    ``resume`` / ``overwrite`` / ``input_key`` (what identifies the input): an interrupted export,
    see the module docstring (crash safety). ``run_settings``: stored for a later ``resume=true``
    over the finished file (:mod:`protein_performer.analysis.rerun`; :func:`run_export` sets it).
    """
    loaded = model if isinstance(model, LoadedModel) else None
    lm: PerformerLM = loaded.model if loaded else model
    sha = checkpoint_sha256 or (loaded.sha256 if loaded else "")
    inc = parse_include(include)
    sel = MapSelection.of(selection)
    sel.resolve(len(lm.blocks), int(lm.config.heads))  # refused before any work
    if crop not in CROPS:
        raise ExportError(f"crop must be one of {CROPS}, got {crop!r}")
    output = Path(output)
    check_output(output)
    meta = {
        "checkpoint": loaded.checkpoint if loaded else "",
        "seed": loaded.seed if loaded else None,
        **(loaded.info if loaded else {}),
        "include": list(inc),
        "crop": crop,
        **({} if sel.is_default() else {"selection": sel.as_dict()}),
        **(metadata or {}),
    }
    settings = json.loads(
        json.dumps(
            {"meta": meta, "model_config": asdict(lm.config), "checkpoint_sha256": sha, "input": input_key}, default=str
        )
    )
    resumable = ResumableH5(output, "export", resume, overwrite, ExportError)
    run = _ExportRun(lm, resumable, inc, crop, find_interrupted(resumable, settings), sel)
    was_training = lm.training
    lm.eval()
    t0 = time.perf_counter()
    bar = _progress_bar(sequences, max_sequences, progress)
    try:
        run.open(settings, sha)
        for n, rec in enumerate(sequences):
            if max_sequences is not None and run.counts.records >= max_sequences:
                break
            stored = run.add(n, rec if isinstance(rec, SequenceRecord) else SequenceRecord(*rec))
            if stored and bar is not None:
                bar.update(1)
        run.finish(meta, input_report.failures if input_report is not None else [], run_settings)
    except BaseException as e:
        replacement = run.abort(e)
        if replacement is not None:
            raise replacement from e
        raise
    finally:
        if bar is not None:
            bar.close()
        lm.train(was_training)
    return _summary(run, sha, time.perf_counter() - t0)


def _summary(run: _ExportRun, sha: str, seconds: float) -> ExportSummary:
    counts = run.counts
    log.info(
        "exported %d sequences (%d residues, %d cropped, %d skipped; %d kept from an interrupted export) "
        "to %s in %.1f s",
        counts.records,
        counts.residues,
        counts.cropped,
        counts.skipped_too_long,
        counts.copied,
        run.output,
        seconds,
    )
    return ExportSummary(
        str(run.output),
        **counts.totals(),
        skipped=counts.skipped,
        seconds=round(seconds, 3),
        layers=run.depth,
        heads=run.heads,
        causal=run.causal,
        include=list(run.inc),
        checkpoint_sha256=sha,
        resumed_records=counts.copied,
    )


def run_export(
    checkpoint: str,
    input: str,
    output: str,
    include: Sequence[str] = ("attentions", "apc"),
    model_config: dict | str | None = None,
    seed: int = 0,
    crop: str = "error",
    max_sequences: int | None = None,
    min_residues: int = 30,
    invalid: str = "error",
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    selection: MapSelection | dict | None = None,
) -> ExportSummary:
    """What ``python -m protein_performer.export_attention`` does: load, read, export. Returns the
    :class:`ExportSummary` (with ``input_failures``: structure files / chains / FASTA records left out).
    ``resume`` / ``overwrite``: an interrupted export (see :func:`export_attention`); ``resume``
    over a finished ``output`` made with the same settings returns its summary and does nothing
    (:mod:`protein_performer.analysis.rerun`)."""
    t0 = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not Path(input).exists():
        raise MissingFileError(f"input not found: {input}")
    check_output(Path(output))
    options = {
        "command": "export_attention",
        "include": list(parse_include(include)),
        "crop": crop,
        "max_sequences": max_sequences,
        "min_residues": int(min_residues),
        "invalid": invalid,
        **({} if MapSelection.of(selection).is_default() else {"selection": MapSelection.of(selection).as_dict()}),
    }

    def settings(sha: str | None = None) -> dict:
        return rerun.run_settings(checkpoint, model_config, seed, input, sha, **options)

    partial, journal = partial_paths(output)
    if rerun.finished_output(
        Path(output), partial, settings, resume, overwrite, lambda h5: INCOMPLETE_ATTR not in h5.attrs
    ):
        journal.unlink(missing_ok=True)  # a kill after the final rename can leave it
        return ExportSummary.of_finished(Path(output), time.perf_counter() - t0)
    loaded = load_model(checkpoint, model_config, seed, device)
    report = InputReport()
    seqs = read_sequences(input, min_residues=min_residues, invalid=invalid, report=report)
    if is_structure_input(input):
        seqs = list(seqs)  # a few chains: read them all first, so the progress bar knows the total
    summary = export_attention(
        loaded,
        seqs,
        output,
        include=include,
        crop=crop,
        max_sequences=max_sequences,
        metadata={"input": str(input)},
        progress=progress,
        input_report=report,
        resume=resume,
        overwrite=overwrite,
        input_key=input_key(input),
        run_settings=settings(loaded.sha256),
        selection=selection,
    )
    summary.input_failures = report.failures
    return summary
