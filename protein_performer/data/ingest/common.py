"""What every ingest stage shares: the output and work-dir layout, the raw record of stage 1, the
split codes, the errors, and reading a unit's records. Its files are written atomically with
:mod:`protein_performer.outputs` (``durable=False``: no fsync, as the per-block progress is
rewritten every MiB of input).

Split codes (one ``int8`` per record after the resolve step; stage 3 writes the records whose code
is an index into ``SPLITS``)::

    0 train, 1 valid, 2 test   by the salted hash of the sequence (stage 1, ``hsplit``)
    3 ood                      the sequence has a record in a held-out family
    -1 duplicate               a later record of a sequence already kept: dropped
    -2 id conflict             a later record of an id first seen with another sequence: rejected
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protein_performer.data.shards import MANIFEST_NAME, SPLITS
from protein_performer.errors import UserError

FORMAT_VERSION = 1
WORK_DIR = "_work"
CONFIG_NAME = "ingest_config.json"
REJECTS_NAME = "rejects.tsv"
SLURM_LOG_DIR = "_slurm"  # hydra.sweep.dir in conf/ingest.yaml (multirun / submitit logs)
HASH_SPLITS = ("train", "valid", "test")

TRAIN_CODE, VALID_CODE, TEST_CODE = 0, 1, 2  # indices of HASH_SPLITS (and of SPLITS); kept codes are >= 0
OOD_CODE = 3  # index of "ood" in SPLITS
DUPLICATE_CODE = -1  # a dropped duplicate of a kept sequence
ID_CONFLICT_CODE = -2  # a record whose id was first seen with another sequence
assert SPLITS.index("ood") == OOD_CODE and SPLITS[: len(HASH_SPLITS)] == HASH_SPLITS

REJECT_REASONS = (
    "header_only", "missing_id", "empty_sequence", "invalid_character", "too_short", "too_long",
    "duplicate_id_conflict",
)  # fmt: skip

# One raw record of stage 1 (records.bin): sequence length, BLAKE2b-128 of the tokens, a 128-bit key
# of the id (see hashing.id_keys), id length in bytes, header line (relative to the unit's first
# record), the hash split (TRAIN_CODE, VALID_CODE or TEST_CODE) and whether the record is in a
# held-out family.
REC = np.dtype(
    [("length", "<i8"), ("seq", "<u8", (2,)), ("idh", "<u8", (2,)), ("id_len", "<i4"),
     ("line", "<i8"), ("hsplit", "u1"), ("ood", "u1")]
)  # fmt: skip

WINDOW = 1 << 22  # records read at a time in the merge (resolve and shard writing)


class IngestError(UserError, RuntimeError):
    """An ingestion that cannot go on; the message says where and what to do."""


class SimulatedInterruption(RuntimeError):
    """Raised by the ``fail_after_records`` / ``fail_after_shards`` test hooks."""


def unit_dir(out: Path, unit: int) -> Path:
    """The work folder of stage-1 unit ``unit``: its raw files, checkpoint and summary."""
    return out / WORK_DIR / f"unit-{unit:04d}"


def load_records(unit_path: Path, in_memory_below: int = 64 << 20) -> np.ndarray:
    """The REC records of one unit: read when small (faster field access), memory-mapped when large."""
    path = unit_path / "records.bin"
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, dtype=REC)
    if size < in_memory_below:
        return np.fromfile(path, dtype=REC)
    return np.memmap(path, dtype=REC, mode="r")


__all__ = [
    "CONFIG_NAME", "DUPLICATE_CODE", "FORMAT_VERSION", "HASH_SPLITS", "ID_CONFLICT_CODE", "IngestError", "MANIFEST_NAME",
    "OOD_CODE", "REC", "REJECTS_NAME", "REJECT_REASONS", "SLURM_LOG_DIR", "SPLITS", "SimulatedInterruption", "TEST_CODE",
    "TRAIN_CODE", "VALID_CODE", "WINDOW", "WORK_DIR", "load_records", "unit_dir",
]  # fmt: skip
