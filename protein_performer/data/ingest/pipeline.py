"""The two public calls: :func:`ingest` (all stages, or one part) and :func:`merge` (resolve,
stage 3, rejects.tsv and the manifest, over the finished stage-1 units)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from protein_performer.outputs import staged_directory, write_json

from .common import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REJECTS_NAME,
    WORK_DIR,
    IngestError,
    unit_dir,
)
from .config import FINGERPRINT_KEYS, IngestConfig, default_config, resolve_config
from .manifest import build_manifest, count_records, input_sources, split_summaries
from .output import WRITTEN_NAMES, prepare_output, remove_partial_files, rerun_of_finished
from .read import run_unit
from .rejects import collect_rejects, write_rejects
from .resolve import resolve
from .workers import READ_STAGE, WRITE_STAGE, UnitJob, Workers

log = logging.getLogger(__name__)

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def ingest(cfg: Any = None, **overrides) -> dict:
    """Run an ingest (or one part, or the merge) and return the manifest (a part returns its summary).

    ``cfg``: a dict or DictConfig with the keys of conf/ingest.yaml; ``overrides`` win over it.
    """
    resolved = resolve_config(cfg, **overrides)
    try:
        return _ingest(resolved)
    except OSError as e:
        if not _is_disk_full(e):
            raise
        raise IngestError(
            f"{resolved.output_dir}: no space left on the device (or the file size limit was reached) while "
            f"ingesting ({' '.join(str(e).split())[:200]}). Nothing is marked complete: free space (the work files "
            "need about the size of the FASTA, the shards about half of it), then rerun the same command with resume=true"
        ) from e


def _is_disk_full(e: OSError) -> bool:
    """A full disk or a file-size limit, from Python (errno) or from HDF5 (only in the message)."""
    if e.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(e)
    return any(f"errno = {n}," in text for n in _DISK_FULL_ERRNOS) or any(
        os.strerror(n) in text for n in _DISK_FULL_ERRNOS
    )


def _ingest(cfg: IngestConfig) -> dict:
    if cfg.merge:
        return merge(cfg.output_dir, workers=int(cfg.workers), progress=cfg.progress)
    parts_mode = cfg.part is not None
    out = Path(cfg.output_dir)
    if rerun_of_finished(cfg, parts_mode):
        with staged_directory(out, ours=WRITTEN_NAMES.__contains__) as stage:
            return _ingest(replace(cfg, output_dir=str(stage), resume=False, overwrite=False))
    prepare_output(cfg, parts_mode)
    if cfg.resume and not parts_mode and (out / MANIFEST_NAME).is_file():
        return _already_complete(out)
    if parts_mode:
        if cfg.num_parts is None:
            raise IngestError("part=i needs num_parts=n (the total number of parts)")
        part = int(cfg.part)
        if not 0 <= part < len(cfg.units):
            raise IngestError(f"part={part} out of range for num_parts={cfg.num_parts}")
        return run_unit(cfg, part, resume=cfg.resume)
    workers = int(cfg.workers)
    jobs = [UnitJob(READ_STAGE, cfg, u, resume=cfg.resume) for u in range(len(cfg.units))]
    pool = Workers(workers, len(jobs))  # the same processes for stage 1 and stage 3
    # sha256 of the inputs for the manifest: queued behind the last stage-1 unit of a worker
    # process (the main process has its own unit), or in a thread after stage 1 with one worker.
    # Either way it runs while a core would otherwise wait for the other units or the serial
    # resolve step, instead of taking CPU from stage 1.
    sources = pool.defer(input_sources, cfg.input)
    try:
        start = time.perf_counter()
        pool.map(jobs)
        log.info("stage 1 (%d units, %d workers): %.2fs", len(jobs), workers, time.perf_counter() - start)
        return merge(cfg.output_dir, workers=workers, progress=cfg.progress, _cfg=cfg, _pool=pool, _sources=sources)
    finally:
        pool.close()


def _already_complete(out: Path) -> dict:
    """resume=true on a finished ingest: the manifest is written last, after every shard (a kill
    may have come while the work files were removed: finish that)."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IngestError(
            f"{out / MANIFEST_NAME}: written by another format version ({manifest.get('format_version')!r}, "
            f"this is {FORMAT_VERSION}); rerun without resume=true to ingest again (overwrite=true if asked)"
        )
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    log.info("resume=true: %s is already complete", out)
    return manifest


def merge(
    output_dir: str | os.PathLike,
    workers: int = 1,
    progress: bool = True,
    _cfg: IngestConfig | None = None,
    _pool: Workers | None = None,
    _sources: Callable[[], list[dict]] | None = None,
) -> dict:
    """Resolve dedup and id conflicts over all units, write the shards and the manifest."""
    out = Path(output_dir).absolute()
    config_path = out / CONFIG_NAME
    if not config_path.is_file():
        raise IngestError(f"{out}: no {CONFIG_NAME}; nothing to merge (run the parts first: part=i num_parts=n)")
    cfg = _cfg or _recorded_config(out, progress)
    n_units = len(cfg.units)
    missing = [u for u in range(n_units) if not (unit_dir(out, u) / "done.json").is_file()]
    if missing and (out / MANIFEST_NAME).is_file() and not (out / WORK_DIR).exists():
        return json.loads((out / MANIFEST_NAME).read_text())
    if missing:
        raise IngestError(
            f"{out}: parts {missing} of {n_units} have not finished; run them (part=i num_parts={n_units}, "
            "resume=true continues an interrupted part), then merge again"
        )
    summaries = [json.loads((unit_dir(out, u) / "done.json").read_text()) for u in range(n_units)]
    start = time.perf_counter()
    final, conflicts = resolve(out, n_units, float(cfg.merge_memory_mb or 256))
    log.info("resolved dedup over %d records in %.2fs", sum(len(f) for f in final), time.perf_counter() - start)
    rejects = collect_rejects(out, cfg, summaries, conflicts)
    remove_partial_files(out)
    results = _write_shards(cfg, final, workers, _pool)
    counts = count_records(summaries, final, conflicts)
    write_rejects(out, rejects)
    if counts.n_unique == 0:  # nothing to train on: no manifest (no reader takes this for a dataset)
        _no_valid_record(out, cfg, counts)
    sources = _sources() if _sources is not None else input_sources(cfg.input)
    splits = split_summaries(results)
    manifest = build_manifest(cfg, sources, splits, counts)
    if counts.n_records != counts.n_unique + counts.n_duplicates + sum(counts.rejected.values()):
        raise IngestError(f"internal error: counts do not add up in {out}: please report")
    write_json(out / MANIFEST_NAME, manifest, durable=False, indent=1)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    log.info(
        "ingest done: %d records, %d unique, %d duplicates, rejected %s; %s",
        counts.n_records, counts.n_unique, counts.n_duplicates, counts.rejected,
        {s: v["n_sequences"] for s, v in splits.items()},
    )  # fmt: skip
    return manifest


def _recorded_config(out: Path, progress: bool) -> IngestConfig:
    """The options the parts in ``out`` were run with (its ingest_config.json), the rest defaults."""
    recorded = {k: v for k, v in json.loads((out / CONFIG_NAME).read_text()).items() if k in FINGERPRINT_KEYS}
    return IngestConfig(**{**default_config(), **recorded, "output_dir": str(out), "progress": progress})


def _write_shards(cfg: IngestConfig, final: list, workers: int, pool: Workers | None) -> list:
    """Stage 3 over all units, on ``pool`` (then asked to stop) or on a pool of its own."""
    jobs = [UnitJob(WRITE_STAGE, cfg, u, final=final[u]) for u in range(len(final))]
    start = time.perf_counter()
    if pool is None:
        own = Workers(workers, len(jobs))
        try:
            results = own.map(jobs)
        finally:
            own.close()
    else:
        results = pool.map(jobs)
        pool.stop()
    log.info("stage 3 (shards): %.2fs", time.perf_counter() - start)
    return results


def _no_valid_record(out: Path, cfg: IngestConfig, counts) -> None:
    """Every record was rejected: remove the work files and the config (not an interrupted ingest
    either: nothing to resume) and say why."""
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    (out / CONFIG_NAME).unlink(missing_ok=True)
    what = ", ".join(f"{v} {k}" for k, v in counts.rejected.items()) or "none"
    raise IngestError(
        f"{', '.join(cfg.input)}: no valid record: all {counts.n_records} records were rejected ({what}); "
        f"each is listed with its line in {out / REJECTS_NAME}. Check that this is a protein FASTA file and the "
        "min_length/max_length filter; no shards were written"
    )
