"""Resumable HDF5 outputs: the protocol ``export_attention`` (maps.h5), ``embed`` and
``predict_contacts`` write their one HDF5 file with (:class:`ResumableH5`).

1. The run writes ``<output>.partial`` and renames it onto ``output`` only when it is complete
   (:meth:`ResumableH5.publish`), so ``output`` is either the previous file or the new complete one.
2. A partial file left by a killed run is refused unless ``resume=true`` (continue it) or
   ``overwrite=true`` (discard it and start again).
3. ``resume=true`` continues it only when it was started with the same settings; a partial file of
   other settings is refused, naming the settings that differ.
4. A record is committed in two steps (:meth:`ResumableH5.commit`): its data are written and
   flushed, and only then is its commit mark set (and flushed). HDF5 writes what one flush holds in
   no particular order, so a kill inside the first flush can leave half-written data but never a
   mark on it; a resumed run keeps exactly the marked records.
5. When complete, the ``run_settings`` attribute (what a later ``resume=true`` over the finished file
   compares, see :mod:`protein_performer.analysis.rerun`) and the completion mark are set
   (:meth:`ResumableH5.complete`).

Where the marks live is the writer's: ``embed`` counts the committed rows in a root attribute,
``predict_contacts`` marks each record's group ``done``, the export journals each record (with its
CRC-32s) beside the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py

from protein_performer.errors import UserError, first_line
from protein_performer.outputs import publish

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
SETTINGS_ATTR = "run_settings"


def partial_path(output: str | Path) -> Path:
    """Where a run writes ``output`` until it is complete."""
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


def settings_json(settings: dict) -> str:
    """The ``run_settings`` attribute's value."""
    return json.dumps(settings, sort_keys=True)


class ResumableH5:
    """One HDF5 output written as ``<output>.partial`` record by record (the module docstring's
    protocol). ``what`` names the run in messages (``export``, ``embed run``); ``error``: the
    :class:`UserError` subclass raised on a refusal. Creating it refuses an interrupted run's
    partial file unless ``resume`` or ``overwrite``."""

    def __init__(
        self, output: str | Path, what: str, resume: bool, overwrite: bool, error: type[UserError] = UserError
    ):
        self.output = Path(output)
        self.partial = partial_path(self.output)
        self.what, self.resume, self.error = what, resume, error
        if self.partial.exists() and not resume:
            if not overwrite:
                raise error(
                    f"{self.partial}: an interrupted {what} of {self.output} is there; rerun with resume=true "
                    "to continue it, or overwrite=true to start again"
                )
            log.warning("overwrite=true: the interrupted %s %s is discarded", what, self.partial)

    def check_settings(self, found: dict, settings: dict) -> None:
        """Refuse to continue an interrupted run whose settings (``found``) are not ``settings``."""
        if found != settings:
            diff = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise self.error(
                f"{self.partial}: the interrupted {self.what} ran with other settings ({', '.join(diff)} differ); "
                "rerun with the same settings and resume=true, or with overwrite=true to start again"
            )

    def resumes(self, settings: dict, read_settings: Callable[[h5py.File], dict]) -> bool:
        """True when this run continues the interrupted one: ``resume``, its partial file readable
        and started with ``settings`` (``read_settings(h5)`` reads them back; another run's file is
        refused). False: start afresh (no partial file, no ``resume``, or one killed while its
        header was written)."""
        if not (self.resume and self.partial.exists()):
            return False
        try:
            with h5py.File(self.partial, "r") as h5:
                found = read_settings(h5)
        except (OSError, KeyError) as e:
            log.warning("%s: unreadable (%s): starting again", self.partial, first_line(e))
            return False
        self.check_settings(found, settings)
        return True

    def open(self, resumed: bool) -> h5py.File:
        """The partial file, open to continue it (``resumed``) or new and empty."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        return h5py.File(self.partial, "a" if resumed else "w")

    @staticmethod
    def commit(h5: h5py.File, node: h5py.HLObject, mark: str, value: Any) -> None:
        """Commit what was written since the last mark: flush it, then set the mark ``node.attrs[mark]``
        (and flush that)."""
        h5.flush()
        node.attrs[mark] = value
        h5.flush()

    @staticmethod
    def complete(attrs: h5py.AttributeManager, run_settings: dict, mark: str | None = None) -> None:
        """The file is complete: its ``run_settings`` and then the completion mark ``attrs[mark] = True``."""
        attrs[SETTINGS_ATTR] = settings_json(run_settings)
        if mark is not None:
            attrs[mark] = True

    def publish(self) -> None:
        """Rename the complete partial file onto ``output``."""
        publish(self.partial, self.output)
