"""The output folder of an ingest: refuse a foreign or differently configured one, clean what an
ingest wrote (never anything else), remove the temporary files a killed run left, and never
destroy a finished ingest (issue 18): a rerun over one is refused unless ``resume=true`` (it is
complete: nothing to do) or ``overwrite=true`` (the new ingest is written into a staging folder
beside it and swapped in when complete; :func:`rerun_of_finished`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from protein_performer.outputs import remove_temporaries, write_json

from .common import CONFIG_NAME, MANIFEST_NAME, REJECTS_NAME, SLURM_LOG_DIR, SPLITS, WORK_DIR, IngestError
from .config import IngestConfig, fingerprint

log = logging.getLogger(__name__)

# names an ingest may find in its output dir: its own outputs and the multirun/SLURM log folder
OUR_NAMES = {MANIFEST_NAME, REJECTS_NAME, CONFIG_NAME, WORK_DIR, SLURM_LOG_DIR, *SPLITS}
# what an ingest writes (a replacing ingest keeps everything else of the folder, its logs included)
WRITTEN_NAMES = frozenset(OUR_NAMES - {SLURM_LOG_DIR})


def rerun_of_finished(cfg: IngestConfig, parts_mode: bool) -> bool:
    """True when ``output_dir`` holds a finished ingest (its manifest) that this run would replace:
    then the caller ingests into a staging folder (:func:`protein_performer.outputs.staged_directory`).
    Refused (the finished ingest untouched) without ``overwrite``, and for one part of a parallel
    ingest. False when there is no finished ingest, or when ``resume`` keeps it."""
    out = Path(cfg.output_dir)
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        return False
    config_path = out / CONFIG_NAME
    found, wanted = (json.loads(config_path.read_text()) if config_path.is_file() else {}), fingerprint(cfg)
    same = found == wanted
    if cfg.resume and (same or not cfg.overwrite):
        return False  # resume: complete (same config) or refused by prepare_output (another one)
    if not cfg.overwrite or parts_mode:
        n = json.loads(manifest.read_text()).get("n_unique", "?")
        raise IngestError(
            f"{out} holds a finished ingest ({n} sequences, {MANIFEST_NAME})"
            + ("" if same else f" made with a different config (differs in: {_differing(found, wanted)})")
            + ": "
            "refusing to replace it"
            + (
                " from one part of a parallel ingest (run without part= and with overwrite=true, or choose a new output_dir)."
                if parts_mode
                else ". resume=true checks that it is complete and exits; overwrite=true ingests again (the finished "
                "shards stay readable until the new ones are complete and replace them); or choose a new output_dir."
            )
        )
    log.warning(
        "overwrite=true: ingesting again beside %s; the finished ingest stays until the new one is complete", out
    )
    return True


def clean_output(out: Path) -> None:
    """Remove what an ingest writes (never anything else)."""
    for name in (MANIFEST_NAME, REJECTS_NAME, CONFIG_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    for split in SPLITS:
        folder = out / split
        if folder.is_dir():
            for path in folder.glob("*.h5*"):
                path.unlink()
            try:
                folder.rmdir()
            except OSError:
                pass


def remove_partial_files(out: Path) -> None:
    """Remove the temporary files a killed run left (a shard, the manifest or rejects.tsv being
    written: :func:`protein_performer.outputs.remove_temporaries`, and the ``<name>.tmp-<pid>`` and
    ``rejects.tsv.tmp`` of earlier versions); they were never renamed, so nothing lists or reads them."""
    removed = remove_temporaries(out, legacy=("*.tmp-*", f"{REJECTS_NAME}.tmp"))
    for split in SPLITS:
        removed += remove_temporaries(out / split, legacy=("*.tmp-*",))
    for path in removed:
        log.info("removed %s (left by an interrupted run)", path)


def prepare_output(cfg: IngestConfig, parts_mode: bool) -> None:
    """Make ``output_dir`` ready: refuse a file, a foreign folder or another config (unless
    ``overwrite``), start afresh unless resuming, and record the config's fingerprint."""
    out = Path(cfg.output_dir)
    for above in (out, *out.parents):  # a file where the directory (or one above it) should be
        if above.exists() and not above.is_dir():
            raise IngestError(
                f"output_dir {out}: {above} is a file, not a directory; choose a directory (new or empty) for the shards"
            )
        if above.exists():
            break
    wanted = fingerprint(cfg)
    config_path = out / CONFIG_NAME
    if config_path.is_file():
        _reuse_or_clean(out, json.loads(config_path.read_text()), wanted, cfg, parts_mode)
    elif out.is_dir() and any(p.name not in OUR_NAMES for p in out.iterdir()):
        if not cfg.overwrite:
            raise IngestError(
                f"{out} is not empty and holds no {CONFIG_NAME}: refusing to write into it. "
                "Choose an empty or new output_dir, or pass overwrite=true (only files an ingest writes are removed)."
            )
        clean_output(out)
    out.mkdir(parents=True, exist_ok=True)
    if not config_path.is_file():
        write_json(config_path, wanted, durable=False, indent=1)


def _differing(found: dict, wanted: dict) -> str:
    return ", ".join(sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k)))


def _reuse_or_clean(out: Path, found: dict, wanted: dict, cfg: IngestConfig, parts_mode: bool) -> None:
    """An output dir with an ingest config: keep it (same config, resuming or a part), replace it
    (another config and ``overwrite``), or refuse."""
    if found != wanted:
        if not cfg.overwrite or parts_mode:
            raise IngestError(
                f"{out} holds an ingest made with a different config (differs in: {_differing(found, wanted)}). "
                "Choose another output_dir, or pass overwrite=true to replace it"
                + (" (run without part= to do so)." if parts_mode else ".")
            )
        log.warning("overwrite=true: removing the previous ingest in %s", out)
        clean_output(out)
    elif not cfg.resume and not parts_mode:
        clean_output(out)
