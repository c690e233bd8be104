"""Contact study, the data: every maps record paired with its structure chain as a
:class:`Protein` (true contacts on the sequence's positions, and the pair features of each map
set: "trained" from the model's maps, "random_init" from a baseline's).

Pair features: each map ``A`` symmetrized and APC-corrected, ``APC(A + A^T)`` (stored as ``apc``
in maps.h5, else computed), the layers x heads values at a pair ``(i, j)``, ``j - i >= MIN_SEP``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protein_performer.analysis.contacts.metrics import MIN_SEP, contact_map
from protein_performer.analysis.maps.format import MapsRecord
from protein_performer.analysis.maps.ops import apc, symmetrize
from protein_performer.analysis.maps.reader import MapsFile
from protein_performer.analysis.structures import (
    AlignmentMismatchError,
    Chain,
    LoadFailure,
    align_to_sequence,
    coords_on_sequence,
    file_stem,
)

log = logging.getLogger(__name__)

TRAINED, RANDOM_INIT = "trained", "random_init"  # the map sets


@dataclass
class Protein:
    """A chain paired with its maps: the true contacts and the pair features of each map set."""

    name: str
    source: str
    sequence: str
    true: np.ndarray  # (L, L) contact_map on the sequence's positions
    i: np.ndarray  # (P,) pairs i < j with j - i >= MIN_SEP
    j: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)  # map set -> (P, layers*heads)
    n_heads: dict[str, tuple[int, int]] = field(default_factory=dict)  # map set -> (layers, heads)
    alignment: dict = field(default_factory=dict)

    @property
    def L(self) -> int:
        return len(self.sequence)

    @property
    def y(self) -> np.ndarray:
        """(P,) pair labels: 1.0 contact, 0.0 not, NaN unresolved."""
        return self.true[self.i, self.j]

    def pred_matrix(self, scores: np.ndarray) -> np.ndarray:
        """(L, L) symmetric score matrix from pair scores; NaN off the scored pairs."""
        m = np.full((self.L, self.L), np.nan)
        m[self.i, self.j] = scores
        m[self.j, self.i] = scores
        return m


def pair_features(maps: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(P, layers*heads) float32: the values at pairs (i, j) of (layers, heads, L, L) maps."""
    maps = np.asarray(maps)
    flat = maps.reshape(-1, maps.shape[-2], maps.shape[-1])
    return np.ascontiguousarray(flat[:, i, j].T, dtype=np.float32)


def apc_of(rec: MapsRecord, path: Path) -> np.ndarray:
    """The record's APC maps: stored, else computed from its attentions."""
    if rec.apc is not None:
        return rec.apc
    if rec.attentions is None:
        raise ValueError(f"{path} record {rec.id}: neither 'apc' nor 'attentions' stored")
    return apc(symmetrize(rec.attentions.astype(np.float32)))


def _chain_index(chains: Sequence[Chain]) -> dict[str, Chain]:
    idx: dict[str, Chain] = {}
    for c in chains:
        idx.setdefault(c.key, c)
        idx.setdefault(c.name, c)
    return idx


def _selected(chain: Chain, wanted: set[str] | None) -> bool:
    if wanted is None:
        return True
    return bool({chain.key, chain.name, Path(chain.path).name, file_stem(chain.path)} & wanted)


def _failure(failures: list[LoadFailure], failure: LoadFailure) -> None:
    failures.append(failure)
    log.warning("%s", failure.reason)


def load_proteins(
    maps: str | Path,
    chains: Sequence[Chain],
    baseline_maps: str | Path | None = None,
    wanted: Sequence[str] | None = None,
    threshold: float = 8.0,
    min_identity: float = 0.9,
    max_mismatches: int = 3,
) -> tuple[list[Protein], list[LoadFailure]]:
    """Pair every record of ``maps`` with its chain (by ``source`` = ``Chain.key``, else by ``id`` =
    ``Chain.name``), align, and extract pair features ("trained", and "random_init" from
    ``baseline_maps``). ``wanted`` restricts to chains named by key, name, file name or stem.
    Failures (no chain, mismatch, bad maps) are logged and returned; the others go on."""
    maps = Path(maps)
    index = _chain_index(chains)
    wanted_set = set(wanted) if wanted else None
    proteins: list[Protein] = []
    failures: list[LoadFailure] = []
    used: set[str] = set()
    with MapsFile(maps) as mf:
        for rec in mf.iter(load=("attentions", "apc")):
            chain = index.get(rec.source) or index.get(rec.id)
            if chain is None:
                if wanted_set is None:
                    _failure(
                        failures,
                        LoadFailure(
                            rec.source or rec.id,
                            None,
                            f"{maps} record {rec.id}: no structure chain matches "
                            f"source {rec.source!r} or id {rec.id!r}",
                        ),
                    )
                continue
            if not _selected(chain, wanted_set):
                continue
            used.add(chain.key)
            try:
                proteins.append(_protein(rec, chain, maps, threshold, min_identity, max_mismatches))
            except (AlignmentMismatchError, ValueError) as e:
                _failure(failures, LoadFailure(chain.path, chain.chain_id, str(e)))
    if wanted_set is not None:
        _check_wanted(maps, chains, wanted_set, used, failures)
    if baseline_maps is not None:
        _add_baseline(proteins, Path(baseline_maps), failures)
    log.info("%d proteins ready, %d failures", len(proteins), len(failures))
    return proteins, failures


def _protein(
    rec: MapsRecord, chain: Chain, maps: Path, threshold: float, min_identity: float, max_mismatches: int
) -> Protein:
    """The record aligned to its chain, with its true contacts and "trained" pair features."""
    aln = align_to_sequence(chain, rec.sequence, min_identity, max_mismatches)
    true = contact_map(coords_on_sequence(chain, aln), threshold)
    i, j = np.triu_indices(len(rec.sequence), k=MIN_SEP)
    prot = Protein(chain.name, chain.key, rec.sequence, true, i, j, alignment=aln.as_dict())
    maps_apc = apc_of(rec, maps)
    prot.features[TRAINED] = pair_features(maps_apc, i, j)
    prot.n_heads[TRAINED] = tuple(maps_apc.shape[:2])
    return prot


def _check_wanted(
    maps: Path, chains: Sequence[Chain], wanted: set[str], used: set[str], failures: list[LoadFailure]
) -> None:
    """A failure for every wanted name that names no chain, and every wanted chain without a record."""
    for w in sorted(wanted):
        if not any(_selected(c, {w}) for c in chains):
            _failure(failures, LoadFailure(w, None, f"chains: {w!r} names no chain of the structures read"))
    for c in chains:
        if _selected(c, wanted) and c.key not in used:
            _failure(
                failures,
                LoadFailure(
                    c.path,
                    c.chain_id,
                    f"{c.path} chain {c.chain_id}: no record in {maps} (source {c.key!r} or id {c.name!r})",
                ),
            )


def _add_baseline(proteins: list[Protein], path: Path, failures: list[LoadFailure]) -> None:
    """The "random_init" pair features of every protein, from the baseline's maps."""
    with MapsFile(path) as mf:
        for p in proteins:
            record_id = mf.find(p.source, p.name)
            if record_id is None:
                _failure(failures, LoadFailure(p.source, None, f"{path}: no baseline record for {p.name}"))
                continue
            rec = mf.read(record_id, load=("attentions", "apc"))
            if rec.sequence.upper() != p.sequence.upper():
                _failure(
                    failures,
                    LoadFailure(
                        p.source,
                        None,
                        f"{path} record {record_id}: sequence differs "
                        f"from the trained model's maps; baseline skipped for {p.name}",
                    ),
                )
                continue
            maps_apc = apc_of(rec, path)
            p.features[RANDOM_INIT] = pair_features(maps_apc, p.i, p.j)
            p.n_heads[RANDOM_INIT] = tuple(maps_apc.shape[:2])
