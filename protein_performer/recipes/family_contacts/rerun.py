"""Reruns of the family-contacts recipe never destroy a finished output (issue 18, item 3).

``<OUT>/summary.json`` records under ``seconds`` every stage that finished in ``<OUT>``; it is
rewritten (atomically) after each stage, so a killed run leaves the stages it finished on record.
A stage that runs again takes the later stages off the record (their outputs are now stale). A run
of ``stages`` over ``<OUT>``:

- none of them done yet (a fresh ``<OUT>``, or the later stages of a run done in parts): they run in
  ``<OUT>``, as before;
- some done, and neither option: refused (nothing changed), with an error naming the two ways on;
- ``resume=true``: every one done: logged "complete", exit 0, nothing changed; else the ones not
  done run in ``<OUT>`` (after a killed run the finished stages are kept). The settings must be the
  ones the run in ``<OUT>`` recorded (else an error naming ``overwrite=true``);
- ``overwrite=true``: they run in a hidden staging folder beside ``<OUT>`` (a copy of ``<OUT>``
  first when they skip a stage whose outputs a later one reads), which replaces ``<OUT>`` only when complete
  (:func:`protein_performer.outputs.staged_directory`): until then the finished run stays
  readable and byte-identical, and a killed rerun leaves it so. Files in ``<OUT>`` that the recipe
  does not write (a log, notes) are kept. The provenance paths inside the new run's files
  (``csv/hparams.yaml``, ``shards/manifest.json``) name the staging folder it was written in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from protein_performer.errors import UserError
from protein_performer.outputs import recover, staged_directory, write_json

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
# what the recipe writes in <OUT> (train writes checkpoints/, csv/, metrics.json, wandb files there)
OWNED = (
    "family.fasta",
    "shards",
    "checkpoints",
    "csv",
    "lightning_logs",
    "wandb",
    "wandb_run_id.txt",
    "metrics.json",
    "maps.h5",
    "maps_random.h5",
    "contacts.png",
    "probe.jsonl",
    "kortemme40",
    "weights.tsv",
    "contacts.h5",
    "contacts.csv",
    "contact_head.json",
    SUMMARY,
)
# the options compared on resume=true (num_threads= among the overrides is no setting of the result)
SETTINGS = ("family", "input", "structures", "max_identity", "max_sequences", "homologs", "probe_every_s")


def owned(name: str) -> bool:
    """Whether the entry ``name`` of ``<OUT>`` is the recipe's (its temporaries included)."""
    bare = name.lstrip(".")
    return any(bare == o or bare.startswith(o + ".") for o in OWNED)


def settings(overrides: Sequence[str], experiment: str, align: bool, **options) -> dict:
    """The settings a run records in its summary (paths resolved), as JSON holds them."""
    record = {k: str(Path(v).resolve()) if k in ("input", "structures") else v for k, v in options.items()}
    record.update(
        experiment=experiment,
        align=align,
        overrides=[o for o in overrides if not o.lstrip("+~").startswith("num_threads=")],
    )
    return json.loads(json.dumps(record, default=str))


def read_summary(out: Path) -> dict:
    """``<out>/summary.json``, or ``{}`` when there is none."""
    path = out / SUMMARY
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"family_contacts: {path} is not readable ({e}): give overwrite=true to rerun the recipe"
        ) from e
    return summary if isinstance(summary, dict) else {}


def write_summary(out: Path, summary: dict) -> None:
    write_json(out / SUMMARY, summary, indent=2, default=str)


def done_stages(summary: dict, stages: Sequence[str]) -> list[str]:
    """The stages of ``stages`` that ``summary`` records as finished, in their order."""
    return [s for s in stages if s in (summary.get("seconds") or {})]


def needs_copy(stages: Sequence[str], all_stages: Sequence[str]) -> bool:
    """Whether a staged rerun of ``stages`` needs the old output: some stage before the last asked
    for is not asked for (its outputs are the later stages' inputs)."""
    asked = [s for s in all_stages if s in stages]
    return asked != list(all_stages[: len(asked)])


def ran(summary: dict, stage: str, stages: Sequence[str]) -> None:
    """``stage`` ran again: the stages after it (in ``stages``, the recipe's order) are stale."""
    for later in stages[stages.index(stage) + 1 :]:
        (summary.get("seconds") or {}).pop(later, None)


def _check_settings(out: Path, summary: dict, current: dict) -> None:
    recorded = summary.get("settings")
    if recorded is None:  # a run from before the settings were recorded: what it did record
        recorded = {k: summary[k] for k in ("family", "experiment", "align") if k in summary}
        recorded["overrides"] = settings(summary.get("overrides", []), "", False)["overrides"]
    # a run from before the FASTA option was named input= recorded it as data=
    recorded = {"input" if k == "data" else k: v for k, v in recorded.items()}
    diff = [k for k in recorded if recorded[k] != current.get(k)]
    if diff:
        changes = "; ".join(f"{k}: {recorded[k]!r} -> {current.get(k)!r}" for k in diff)
        raise UserError(
            f"family_contacts: {out} holds a run with other settings ({changes}); resume=true continues "
            "only the same run: give the same settings, or overwrite=true to rerun with the new ones"
        )


def plan(out: Path, stages: Sequence[str], all_stages: Sequence[str], current: dict, resume: bool, overwrite: bool):
    """The stages to run (in ``<out>``, or in its staging folder with ``overwrite``); None when
    ``resume`` finds them all done. Raises :class:`UserError` for a rerun over finished stages
    without either option. Folders that killed runs left beside ``<out>`` are cleaned up first."""
    if resume and overwrite:
        raise UserError("family_contacts: give resume=true or overwrite=true, not both")
    recover(out, owned)
    if overwrite:
        return list(stages)
    summary = read_summary(out)
    done = done_stages(summary, all_stages)
    if resume:
        if summary:
            _check_settings(out, summary, current)
        todo = [s for s in stages if s not in done]
        if not todo:
            log.info("family_contacts: %s is complete (stages %s done): nothing to do", out, ", ".join(stages))
            return None
        if done:
            log.info("family_contacts: resuming %s: stages %s done; running %s", out, ", ".join(done), ", ".join(todo))
        return todo
    if any(s in done for s in stages):
        finished = all(s in done for s in stages)
        raise UserError(
            f"family_contacts: {out} already holds {'a finished' if finished else 'an unfinished'} run (stages "
            f"{', '.join(done)} done, see its {SUMMARY}); nothing was changed. Give resume=true to "
            f"{'check that it is complete' if finished else 'run the stages not done'}, or overwrite=true to "
            "rerun into a staging folder beside it that replaces it only when complete "
            "(with make: make family-contacts ... ARGS=resume=true or ARGS=overwrite=true)"
        )
    return list(stages)


@contextlib.contextmanager
def output_folder(out: Path, staged: bool, copy: bool) -> Iterator[Path]:
    """The folder the run writes in: ``out`` itself; or, when ``staged``, a staging folder beside it
    (holding a copy of ``out`` when ``copy``) that replaces ``out`` when the block ends without an error."""
    if not staged:
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with staged_directory(out, ours=owned) as stage:
        if copy and out.is_dir():
            shutil.copytree(out, stage, symlinks=True, dirs_exist_ok=True)
        log.info("overwrite=true: the new run goes to %s; %s stays as it is until it is complete", stage, out)
        yield stage
    log.info("family_contacts: %s replaced by the new run", out)
