"""The resolve step of the merge: id conflicts, dedup and the ood split, over all units at once.

Records are numbered globally in input order (unit by unit). For each record the result is its
final split code (see common.py)::

    id conflict  the first valid record of an id fixes its sequence: a later record with that id
                 and another sequence gets ID_CONFLICT_CODE (rejected: duplicate_id_conflict)
    duplicate    among the rest, the first record of each sequence is kept, later ones get
                 DUPLICATE_CODE
    ood          a kept sequence is OOD_CODE when any of its records is in a held-out family;
                 otherwise it keeps its hash split (TRAIN_CODE, VALID_CODE or TEST_CODE)

Memory stays bounded: the keys are processed in ``n_buckets`` buckets (by their first 64 bits) of
at most ``merge_memory_mb`` (48 bytes per record), each read from the units in windows of
``WINDOW`` records; what is kept is 1 byte per record (the final codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .common import DUPLICATE_CODE, ID_CONFLICT_CODE, OOD_CODE, WINDOW, load_records, unit_dir

_SORT_BYTES_PER_RECORD = 48  # key, global index and extra field of one record in a bucket


class _Bucket(NamedTuple):
    keys: np.ndarray  # (n, 2) uint64
    global_index: np.ndarray  # (n,) input-order index of each record
    extra: np.ndarray | None  # the asked extra field of each record


@dataclass
class _AllRecords:
    """The REC records of every unit, addressed by global index."""

    units: list[np.ndarray]
    base: np.ndarray  # global index of each unit's first record, and the total at the end
    n_buckets: int

    def unit_of(self, global_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unit, index in the unit) of global indices."""
        unit = np.searchsorted(self.base, global_index, side="right") - 1
        return unit, global_index - self.base[unit]

    def gather(self, field: str, bucket: int, final: list[np.ndarray], skip_conflicts=False, extra=None):
        """The ``field`` keys of bucket ``bucket``, all units, in input order, with their global
        indices and the ``extra`` field ("seq" or "ood") if asked (read in windows: bounded memory).
        ``skip_conflicts`` leaves out the records already marked ID_CONFLICT_CODE in ``final``."""
        keys, global_index, extras = [], [], []
        for u, recs in enumerate(self.units):
            base = int(self.base[u])
            for start in range(0, len(recs), WINDOW):
                window = recs[start : start + WINDOW]
                key = np.asarray(window[field])
                selected = None if self.n_buckets == 1 else (key[:, 0] % np.uint64(self.n_buckets) == bucket)
                if skip_conflicts:
                    not_conflict = final[u][start : start + WINDOW] != ID_CONFLICT_CODE
                    selected = not_conflict if selected is None else selected & not_conflict
                if selected is None or selected.all():  # the whole window (one bucket): slices, no index copies
                    index = slice(None)
                    global_index.append(np.arange(start + base, start + base + len(window)))
                else:
                    index = np.flatnonzero(selected)
                    global_index.append(index + (start + base))
                keys.append(key[index])
                if extra:
                    extras.append(np.asarray(window[extra])[index])
        if not keys:
            return None
        return _Bucket(np.concatenate(keys), np.concatenate(global_index), np.concatenate(extras) if extra else None)


def first_occurrence(key: np.ndarray, global_index: np.ndarray):
    """Group equal 128-bit keys; the member with the smallest ``global_index`` is the group's first.

    Returns ``order`` (entries sorted by key), ``is_first`` and ``first_pos`` (for each sorted
    entry, the sorted position of its group's first) and the group ``starts``. A plain sort on
    the first 64 bits is enough unless two different keys share them; then a full lexsort.
    """
    n = len(key)
    high = np.ascontiguousarray(key[:, 0])
    order = np.argsort(high)
    group_starts = np.ones(n, dtype=bool)  # True where a group of equal keys starts
    if n > 1:
        high = high[order]
        same = high[1:] == high[:-1]
        if same.any():  # (the second halves are compared only where the first ones are equal)
            low = key[:, 1][order]
            if (same & (low[1:] != low[:-1])).any():
                order = np.lexsort((global_index, key[:, 1], key[:, 0]))
                sorted_key = key[order]
                same = (sorted_key[1:, 0] == sorted_key[:-1, 0]) & (sorted_key[1:, 1] == sorted_key[:-1, 1])
        group_starts[1:] = ~same
    sorted_index = global_index[order]
    starts = np.flatnonzero(group_starts)
    sizes = np.diff(np.append(starts, n))
    group_min = np.minimum.reduceat(sorted_index, starts) if n else sorted_index
    is_first = sorted_index == np.repeat(group_min, sizes)
    first_pos = np.repeat(np.flatnonzero(is_first), sizes)
    return order, is_first, first_pos, starts


def resolve(out: Path, n_units: int, memory_mb: float) -> tuple[list[np.ndarray], list[list[tuple[int, int]]]]:
    """Per unit: the final split code of each record and, for its id conflicts, ``(index in the
    unit, global index of the record that fixed the id's sequence)``, in unit order."""
    units = [load_records(unit_dir(out, u)) for u in range(n_units)]
    sizes = np.array([len(r) for r in units], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)])
    n_buckets = max(1, math.ceil(int(base[-1]) * _SORT_BYTES_PER_RECORD / (memory_mb * 2**20)))
    records = _AllRecords(units, base, n_buckets)
    final = [np.where(r["ood"] == 1, OOD_CODE, r["hsplit"]).astype(np.int8) for r in units]
    conflicts = _mark_id_conflicts(records, final)
    _mark_duplicates(records, final)
    return final, conflicts


def _mark_id_conflicts(records: _AllRecords, final: list[np.ndarray]) -> list[list[tuple[int, int]]]:
    """The first valid record of an id fixes its sequence; mark the later ones with another."""
    conflict_with: list[dict[int, int]] = [dict() for _ in records.units]
    for bucket in range(records.n_buckets):
        got = records.gather("idh", bucket, final)
        if got is None:
            continue
        high = np.sort(got.keys[:, 0])
        if not (high[1:] == high[:-1]).any():  # every id once (the usual case): nothing to group
            continue
        got = records.gather("idh", bucket, final, extra="seq")
        order, _, first_pos, _ = first_occurrence(got.keys, got.global_index)
        seq = got.extra[order]
        differs = (seq[:, 0] != seq[first_pos, 0]) | (seq[:, 1] != seq[first_pos, 1])
        sorted_index = got.global_index[order]
        for index, first_index in zip(sorted_index[differs].tolist(), sorted_index[first_pos[differs]].tolist()):
            unit, i = records.unit_of(np.array([index]))
            unit, i = int(unit[0]), int(i[0])
            final[unit][i] = ID_CONFLICT_CODE
            conflict_with[unit][i] = first_index
    return [sorted(c.items()) for c in conflict_with]


def _mark_duplicates(records: _AllRecords, final: list[np.ndarray]) -> None:
    """The first record of a sequence is kept, later ones are duplicates; ood if any record is."""
    n_units = len(records.units)
    for bucket in range(records.n_buckets):
        got = records.gather("seq", bucket, final, skip_conflicts=True, extra="ood")
        if got is None:
            continue
        order, is_first, _, starts = first_occurrence(got.keys, got.global_index)
        sorted_index = got.global_index[order]
        dup_unit, dup_i = records.unit_of(sorted_index[~is_first])
        for unit in np.flatnonzero(np.bincount(dup_unit, minlength=n_units)):  # the units present
            final[unit][dup_i[dup_unit == unit]] = DUPLICATE_CODE
        if not got.extra.any():  # no held-out record in this bucket: the kept keep their split
            continue
        any_ood = np.maximum.reduceat(got.extra[order], starts)
        kept_unit, kept_i = records.unit_of(sorted_index[is_first])  # one per group, in group order
        for unit in np.flatnonzero(np.bincount(kept_unit, minlength=n_units)):
            final[unit][kept_i[(kept_unit == unit) & (any_ood == 1)]] = OOD_CODE
