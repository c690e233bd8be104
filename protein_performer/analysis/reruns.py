"""Reruns over a finished output folder (issue 18): ``contacts`` and ``aa_similarity``.

- A rerun writes its whole output into a staging folder beside ``output_dir`` and swaps it in
  when complete (:func:`protein_performer.outputs.staged_directory`): the old report, CSV, plots
  and head stay valid and readable until then, and a killed rerun leaves them byte-identical.
  Files in ``output_dir`` that the command does not write are kept.
- The report JSON records what the run read (``inputs``: each input file's path, size and
  modification time, a folder's listing, and every option). ``resume=true`` on a folder whose
  report has the same ``inputs`` says it is complete and returns that report without work; with
  other inputs it refuses, naming what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from protein_performer.errors import UserError
from protein_performer.outputs import staged_directory

log = logging.getLogger(__name__)


def input_stamp(path: str | Path | None) -> dict | None:
    """What identifies an input without reading it: path, size and modification time of a file;
    for a folder, a digest of its files' names, sizes and times."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():  # the run itself says what is missing
        return {"path": str(path), "missing": True}
    if p.is_dir():
        listing = sorted(
            (str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()
        )
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return {"path": str(path), "files": len(listing), "listing_sha256": digest}
    st = p.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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
