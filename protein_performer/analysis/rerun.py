"""A rerun over a finished output (issue 18).

One HDF5 file (``export_attention``, ``embed``, ``predict_contacts``):

A run writes ``<output>.partial`` and renames it onto ``output`` only when it is complete, so a
rerun, killed at any moment, leaves the previous output as it was (bytes and all) and readable.

Each such file records the settings it was made with, the root attribute ``run_settings``
(JSON, :func:`run_settings`: the checkpoint's sha256 (for ``checkpoint=random`` the seed), the
``model_config`` given, the input's path, size and modification time, and the command's options
that change the output). ``resume=true`` over a finished output and no interrupted run
(:func:`finished_output`) compares them with the new request, without loading the model or
reading the input: the same settings, nothing to do (the file is not touched); other settings,
refused, naming them (a rerun without ``resume=true``, or with ``overwrite=true``, replaces it).

A folder of results (``contacts``, ``aa_similarity``; :func:`staged_output`, :func:`finished_report`):

- A rerun writes its whole output into a staging folder beside ``output_dir`` and swaps it in
  when complete (:func:`protein_performer.outputs.staged_directory`): the old report, CSV, plots
  and head stay valid and readable until then, and a killed rerun leaves them byte-identical.
  Files in ``output_dir`` that the command does not write are kept.
- The report JSON records what the run read (``inputs``: :func:`input_stamp` of each input, and
  every option). ``resume=true`` on a folder whose report has the same ``inputs`` says it is
  complete and returns that report without work; with other inputs it refuses, naming what differs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py

from protein_performer.analysis.export.inputs import input_key
from protein_performer.errors import MissingFileError, UserError, first_line
from protein_performer.outputs import staged_directory
from protein_performer.outputs_h5 import SETTINGS_ATTR
from protein_performer.pretrained import RANDOM, file_sha256, model_config_from

log = logging.getLogger(__name__)


def _model_config_key(model_config: Any) -> Any:
    """What identifies a ``model_config=``: the architecture of a dict or a YAML / JSON file, the
    sha256 of a checkpoint (not loaded)."""
    if model_config is None:
        return None
    if isinstance(model_config, (str, Path)) and Path(model_config).suffix not in (".yaml", ".yml", ".json"):
        path = Path(model_config)
        if not path.is_file():
            raise MissingFileError(f"model_config: no such file {path}")
        return {"checkpoint_sha256": file_sha256(path)}
    return model_config_from(model_config)


def run_settings(
    checkpoint: str | Path,
    model_config: Any,
    seed: int,
    input: str | Path,
    checkpoint_sha256: str | None = None,
    **options: Any,
) -> dict:
    """The settings an output is made with (see the module docstring), as JSON reads them back;
    ``checkpoint_sha256``: the checkpoint's, when it is known (else the file is hashed)."""
    random = str(checkpoint) == RANDOM
    if checkpoint_sha256 is None:
        path = Path(checkpoint)
        if not random and not path.is_file():
            raise MissingFileError(f"checkpoint not found: {path}")
        checkpoint_sha256 = "" if random else file_sha256(path)
    settings = {
        "checkpoint_sha256": checkpoint_sha256,
        "seed": int(seed) if random else None,
        "model_config": _model_config_key(model_config),
        "input": input_key(input),
        **options,
    }
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def finished_output(
    output: Path,
    partial: Path,
    settings: Callable[[], dict],
    resume: bool,
    overwrite: bool,
    is_complete: Callable[[h5py.File], bool],
) -> bool:
    """True when ``resume`` finds ``output`` finished with the same ``settings()`` and no
    interrupted run (``partial``): nothing to do. A finished output made with other settings is
    refused (:class:`UserError` naming them) unless ``overwrite``; False: run (and replace it)."""
    if not resume or partial.exists() or not output.is_file():
        return False
    try:
        with h5py.File(output, "r") as h5:
            complete = is_complete(h5)
            recorded = h5.attrs.get(SETTINGS_ATTR)
    except OSError as e:
        log.warning("%s: not a readable HDF5 file (%s): it is made again", output, first_line(e))
        return False
    if not complete:
        log.warning("%s: not complete: it is made again", output)
        return False
    replace = "rerun without resume=true (or with overwrite=true) to replace it"
    if recorded is None:
        problem = f"{output}: is complete, but records no run settings (an older version wrote it); {replace}"
    else:
        old, new = json.loads(recorded), settings()
        if old == new:
            return True
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        problem = f"{output}: is complete, but was made with other settings ({', '.join(diff)} differ); {replace}"
    if overwrite:
        log.warning("overwrite=true: %s; it is replaced when this run completes", problem.split("; ")[0])
        return False
    raise UserError(problem)


# ---------------------------------------------------------------------- output folders
def input_stamp(path: str | Path | None) -> dict | None:
    """:func:`input_key` of an input that may be absent (None; a missing one is left for the run
    itself to report)."""
    if path is None:
        return None
    if not Path(path).exists():
        return {"path": str(path), "missing": True}
    return input_key(path)


def jsonable(x):
    """``x`` as it reads back from JSON (tuples become lists), so a stored copy compares equal."""
    return json.loads(json.dumps(x))


def finished_report(report: Path, inputs: dict, command: str) -> dict | None:
    """``resume=true``: the finished report in ``report`` if it was made from the same ``inputs``
    (None when there is none: the run goes ahead); a report of other inputs is refused."""
    if not report.is_file():
        log.info("resume=true: no finished %s output in %s; running", command, report.parent)
        return None
    try:
        found = json.loads(report.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{report}: unreadable ({e}); rerun {command} without resume=true to write it again") from e
    wanted = jsonable(inputs)
    stored = found.get("inputs") if isinstance(found, dict) else None
    if stored != wanted:
        stored = stored if isinstance(stored, dict) else {}
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise UserError(
            f"{report}: a finished {command} run with other inputs or settings is there "
            f"({', '.join(diff) or 'not recorded'} differ); rerun without resume=true to replace it"
        )
    log.info("resume=true: %s is already complete (%s); nothing to do", report.parent, report.name)
    return found


def check_output_dir(out: Path) -> None:
    """``out`` can take a command's output folder: not a file, its parent writable (the new output
    is staged beside it), and not the working directory or one above it (that folder is swapped)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, but output_dir= must be a directory")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise UserError(
            f"output_dir={out} is the working directory (or holds it): give the command a folder of its "
            "own (e.g. output_dir=contacts); its output is written beside it and swapped in when complete"
        )
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"{out}: not writable (permission denied); choose a writable output_dir")


@contextlib.contextmanager
def staged_output(out: str | Path, owned: frozenset[str]) -> Iterator[Path]:
    """``with staged_output(out, {"report.json", ...}) as stage``: write the outputs into ``stage``;
    they replace ``out``'s when the block ends without an error (other entries of ``out`` stay)."""
    out = Path(out)
    check_output_dir(out)
    with staged_directory(out.absolute(), ours=owned.__contains__) as stage:
        yield stage
    log.info("wrote %s", out)
