"""Export, crash safety: the ``<output>.partial`` file an export writes, its journal, and what a
killed export left that ``resume=true`` can keep.

``<output>.partial.journal`` is JSON lines: the export's settings, then one line per input
record handled, in input order, written after the record is flushed to the partial file:
``{"n", "id", "group", "checksum"}`` (stored; the CRC-32s of
:func:`~protein_performer.analysis.maps.format.record_checksum`) or ``{"n", "id", "skipped": true}`` (too long,
``crop=skip``). Each line is one ``write``; a line cut by a kill is ignored on reading.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from protein_performer.analysis.maps.format import record_checksum
from protein_performer.errors import first_line
from protein_performer.outputs_h5 import ResumableH5, partial_path

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
JOURNAL_SUFFIX = ".journal"
RESUME_SUFFIX = ".resume"  # a resumed export copies the kept records into <output>.resume.partial first


def partial_paths(output: str | Path) -> tuple[Path, Path]:
    """``(<output>.partial, <output>.partial.journal)``: the file being written and its journal."""
    output = Path(output)
    partial = partial_path(output)
    return partial, partial.with_name(partial.name + JOURNAL_SUFFIX)


class ExportJournal:
    """``<output>.partial.journal`` being written (see the module docstring for its lines)."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self.add({"journal": JOURNAL_VERSION, "settings": settings})

    def add(self, entry: dict) -> None:
        os.write(self._fd, (json.dumps(entry, default=str) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def read(path: Path, settings: dict, run: ResumableH5) -> list[dict]:
        """The contiguous records ``n = 0, 1, ...`` a killed export of ``run`` finished (``[]`` when
        the journal is missing or unreadable); :class:`ExportError` when it ran with other settings."""
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s: journal unreadable (%s): the export starts from the beginning", path, e)
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written when the process was killed
                break
        if not entries or not isinstance(entries[0], dict) or "settings" not in entries[0]:
            log.warning("%s: no journal header: the export starts from the beginning", path)
            return []
        run.check_settings(entries[0]["settings"], settings)
        done = []
        for e in entries[1:]:
            if not isinstance(e, dict) or e.get("n") != len(done):
                break
            done.append(e)
        return done


@dataclass
class Interrupted:
    """What a killed export left that this one keeps: the journal's finished entries and the old
    partial file (open for reading) to copy their records from; ``old`` is None when nothing is
    kept (no interrupted export, no ``resume``, or an unreadable one)."""

    done: list[dict] = field(default_factory=list)
    old: h5py.File | None = None

    def entry(self, n: int, record_id: str) -> dict | None:
        """The journal entry of input record ``n`` while the kept records last, if it is ``record_id``."""
        if self.old is not None and n < len(self.done) and self.done[n].get("id") == record_id:
            return self.done[n]
        return None

    def close(self) -> None:
        if self.old is not None:
            self.old.close()
            self.old = None


def find_interrupted(run: ResumableH5, settings: dict) -> Interrupted:
    """What an interrupted export of ``run.output`` left that ``resume`` keeps (``run`` refused it
    already unless ``resume`` or ``overwrite``; with ``overwrite`` it is discarded)."""
    partial, journal_path = partial_paths(run.output)
    done: list[dict] = []
    if partial.exists():
        if run.resume:
            done = ExportJournal.read(journal_path, settings, run)
    elif run.resume:
        log.info("resume=true: no interrupted export at %s, starting from the beginning", partial)
    if not done:
        return Interrupted()
    try:
        return Interrupted(done, h5py.File(partial, "r"))
    except OSError as e:  # killed before its first flush, or damaged: nothing to copy
        log.warning("%s: unreadable (%s): the export starts from the beginning", partial, first_line(e))
        return Interrupted()


def intact_record(old: h5py.File, entry: dict) -> h5py.Group | None:
    """The group of a journal entry in the interrupted file if its content matches the checksum."""
    try:
        src = old[entry["group"]]
        if record_checksum(src) == entry["checksum"]:
            return src
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:  # h5py on damaged metadata
        log.debug("record %s unreadable: %s", entry.get("id"), e)
    return None
