"""Export, the results: :class:`ExportCounts` (what the file's ``export`` attribute records) and
:class:`ExportSummary` (what :func:`~protein_performer.analysis.export.run_export` returns)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py

log = logging.getLogger(__name__)


@dataclass
class ExportCounts:
    """What an export did so far; :meth:`totals` goes into the file's ``export`` attribute."""

    records: int = 0
    cropped: int = 0
    skipped_too_long: int = 0
    residues: int = 0
    skipped: list[str] = field(default_factory=list)  # ids of the records too long (crop=skip)
    copied: int = 0  # records kept from an interrupted export

    def totals(self) -> dict[str, int]:
        """The counts the ``export`` attribute and the summary hold."""
        return {
            "records": self.records,
            "cropped": self.cropped,
            "skipped_too_long": self.skipped_too_long,
            "residues": self.residues,
        }


@dataclass
class ExportSummary:
    """What an export wrote: the counts, the model's shape, and the input records left out."""

    output: str
    records: int
    cropped: int
    skipped_too_long: int
    residues: int
    skipped: list[str]  # ids of the records too long (crop=skip)
    seconds: float
    layers: int
    heads: int
    causal: bool
    include: list[str]
    checkpoint_sha256: str
    resumed_records: int  # kept from an interrupted export
    input_failures: list[dict] = field(default_factory=list)  # structure files / chains / FASTA records left out
    already_complete: bool = False  # resume=true over a finished output: nothing was done

    @classmethod
    def of_finished(cls, output: Path, seconds: float) -> ExportSummary:
        """The summary of a finished export, read from its file (``resume=true`` over it)."""
        with h5py.File(output, "r") as h5:
            done = json.loads(h5.attrs.get("export", "{}"))
            cfg = json.loads(h5.attrs.get("model_config", "{}"))
            sha, causal = str(h5.attrs.get("checkpoint_sha256", "")), bool(h5.attrs.get("causal", False))
        totals = ExportCounts(**{k: int(done.get(k, 0)) for k in ExportCounts().totals()}).totals()
        log.info("%s is already complete (%d records); nothing to do", output, totals["records"])
        return cls(
            str(output),
            **totals,
            skipped=done.get("skipped", []),
            seconds=round(seconds, 3),
            layers=int(cfg.get("depth", 0)),
            heads=int(cfg.get("heads", 0)),
            causal=causal,
            include=done.get("include", []),
            checkpoint_sha256=sha,
            resumed_records=0,
            input_failures=done.get("input_failures", []),
            already_complete=True,
        )
