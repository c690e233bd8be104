"""The query's contact map of the family-contacts tool (:mod:`.tool`), whatever the model: its files
(``contacts.h5``, ``contacts.csv``, ``contacts.png``) and its scores against a structure."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

from protein_performer.errors import UserError
from protein_performer.outputs import atomic_output

MIN_SEP = 6  # contacts.csv and the head: pairs with |i - j| >= 6
Z_INTERCEPT = -3.0  # the head's logit is z - 3: a pair 3 standard deviations above the mean gets 0.5


def write_contacts(out: Path, pred, head_path: Path) -> list[tuple[int, int, float]]:
    """``contacts.h5``, ``contacts.csv`` (top-L pairs) and ``contacts.png`` of one prediction."""
    from protein_performer.analysis.contacts.plot import plot_prediction

    L = len(pred.sequence)
    top = pred.top_pairs(L, MIN_SEP)
    with atomic_output(out / "contacts.h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update({"id": pred.id, "sequence": pred.sequence, "head": str(head_path), "min_sep": MIN_SEP})
        h5.create_dataset("contacts", data=pred.contacts.astype(np.float32))
        h5.create_dataset("top_pairs", data=np.array([(i, j) for i, j, _ in top], dtype=np.int32).reshape(-1, 2))
        h5.create_dataset("top_probability", data=np.array([p for _, _, p in top], dtype=np.float32))
    with atomic_output(out / "contacts.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["i", "j", "probability"])
        w.writerows([i, j, f"{p:.6f}"] for i, j, p in top)
    plot_prediction(pred, out / "contacts.png", MIN_SEP)
    return top


def structure_scores(contacts: np.ndarray, random_map: np.ndarray, query: str, structure: str | Path) -> dict:
    """``contacts`` and ``random_map`` (the untrained model's), both (L, L) over the query, scored
    against ``structure``'s first chain aligned onto the query (:func:`.scoring.score_map`)."""
    from protein_performer.analysis.contacts import contact_map
    from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence, load_structures
    from protein_performer.recipes.family_contacts.scoring import score_map

    chains, failures = load_structures(structure)
    if not chains:
        raise UserError(f"structure={structure}: no chain read ({failures[0].reason if failures else 'empty'})")
    true = contact_map(coords_on_sequence(chains[0], align_to_sequence(chains[0], query)))
    return {
        "structure": str(structure),
        "chain": chains[0].key,
        "trained": score_map(np.asarray(contacts, dtype=np.float64), true),
        "random_init": score_map(np.asarray(random_map, dtype=np.float64), true),
    }


def headline(summary: dict, scores: dict) -> None:
    """``summary["scores"]`` and the headline numbers of a run's summary."""
    summary["scores"] = scores
    summary["headline"] = {
        "long_P@L": scores["trained"]["long"]["P@L"],
        "long_P@L/5": scores["trained"]["long"]["P@L/5"],
        "random_long_P@L": scores["random_init"]["long"]["P@L"],
        "long_density": scores["trained"]["long_density"],
    }
