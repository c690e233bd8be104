"""The fitted contact head of a family model (issue 12): the recipe's ``contacts`` stage.

The model's maps of every chain of the structure folder (kortemme40: one chain per Pfam family) go
through the ``contacts`` step, which reports the cross-validated precision and saves the contact head
(``<OUT>/kortemme40/contacts/contact_head.json``, for ``predict_contacts``). The head is ESM's:

    p_ij = sigmoid( b + sum_f w_f (x_f - mu_f) / sigma_f ),   x_f = APC(A_f + A_f^T)_ij

an L1 logistic regression (C = 0.15) on 20 training proteins. Fitted with ``train_size=20`` the
report's test proteins are exactly those the saved head did not see. A factored model trained on
rows aligned to its chain (``align=true``) gets the calibrated mean of all maps instead
(``p_ij = sigmoid(a * mean_f x_f + b)``, ``a``, ``b`` fitted on the same 20 chains): its heads
together are the family's couplings, ranked by their mean (the recipe's unsupervised score).

Leave-family-out (:func:`leave_family_out`): the head fitted on 20 chains drawn from those *not* of
the model's family and evaluated on the family's own chain, for the trained model and its random-init
twin, averaged over a few draws of the training chains: how much a supervised read-out of the maps
adds on the protein the model was trained for, without seeing it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein_performer.analysis.contacts import K_FRACS, RANGES, Protein, fit_logistic, precision_table
from protein_performer.analysis.contacts.head import ESM_TRAIN_PROTEINS, training_subset
from protein_performer.analysis.contacts.study import mean_of_heads
from protein_performer.errors import UserError

log = logging.getLogger(__name__)

HEAD_DIR = "kortemme40"  # under the run's output_dir
ESM_C = 0.15
LEAVE_OUT_DRAWS = 5  # draws of the 20 training chains (seeds 0..4)
MAP_SETS = ("trained", "random_init")
CROP = "skip"  # chains longer than the model's positions are left out (the recipe's
# 128 positions hold 126 residues: 34 of the 40 kortemme40 chains)


@dataclass
class HeadPaths:
    """The files of the ``contacts`` stage under ``<OUT>/kortemme40``."""

    root: Path

    @property
    def maps(self) -> Path:
        return self.root / "maps.h5"

    @property
    def maps_random(self) -> Path:
        return self.root / "maps_random.h5"

    @property
    def contacts(self) -> Path:
        return self.root / "contacts"

    @property
    def head(self) -> Path:
        return self.contacts / "contact_head.json"


def export_all(checkpoint: str | Path, structures: str | Path, paths: HeadPaths) -> None:
    """Maps of every chain of ``structures`` for the checkpoint and its random-init twin."""
    from protein_performer.analysis.export import run_export

    paths.root.mkdir(parents=True, exist_ok=True)
    run_export(str(checkpoint), str(structures), str(paths.maps), crop=CROP, overwrite=True, progress=False)
    run_export(
        "random",
        str(structures),
        str(paths.maps_random),
        model_config=str(checkpoint),
        crop=CROP,
        overwrite=True,
        progress=False,
    )


def _mean_precision(tables: Sequence[dict]) -> dict:
    return {r: {k: float(np.mean([t[r][k] for t in tables])) for k in K_FRACS} for r in RANGES}


def leave_family_out(
    proteins: Sequence[Protein],
    family_source: str,
    train_size: int = ESM_TRAIN_PROTEINS,
    draws: int = LEAVE_OUT_DRAWS,
    C: float = ESM_C,
) -> dict:
    """Precision on the chain ``family_source`` (a ``Chain.key``) of heads fitted on ``train_size``
    other chains (``draws`` seeded draws), per map set; plus each draw's long-range P@L."""
    target = [p for p in proteins if p.source == family_source]
    if len(target) != 1:
        raise UserError(f"leave-family-out: {family_source} is not among the exported chains; export them again")
    target = target[0]
    others = [p for p in proteins if p.source != family_source]
    out: dict = {
        "protein": target.name,
        "L": target.L,
        "train_size": min(train_size, len(others)),
        "draws": draws,
        "C": C,
    }
    for key in MAP_SETS:
        if not all(key in p.features for p in proteins):
            continue
        # the mean of all maps, nothing fitted (what a head of kind "mean" ranks by)
        out[f"{key}_mean"] = precision_table(target.pred_matrix(mean_of_heads(target.features[key])), target.true)
        tables = []
        for seed in range(draws):
            train = [others[i] for i in training_subset([p.name for p in others], train_size, seed)]
            model = fit_logistic(train, key, C=C, seed=seed)
            scores = model.predict_proba(target.features[key])[:, 1]
            tables.append(precision_table(target.pred_matrix(scores), target.true))
        out[key] = {"mean": _mean_precision(tables), "draws_long_P@L": [t["long"]["P@L"] for t in tables]}
    return out


def contacts_stage(
    checkpoint: str | Path, structures: str | Path, structure: Path, out: Path, align_to: dict | None = None
) -> dict:
    """Export every chain, run the ``contacts`` step (report + saved head) and the leave-family-out
    head on ``structure``'s chain; returns the summary's ``fitted_head`` entry. ``align_to``
    (``{"id", "sequence"}``, a factored model trained on rows aligned to that chain): the saved head
    is the calibrated mean of all maps (``head_kind=mean``: its maps are the family's couplings over
    the chain's columns, which a regression fitted on other families' chains cannot weigh) and names
    the chain, so that ``predict_contacts`` aligns its inputs onto it."""
    from protein_performer.analysis.contacts import load_proteins, run_contacts
    from protein_performer.analysis.structures import load_structures

    paths = HeadPaths(out / HEAD_DIR)
    export_all(checkpoint, structures, paths)
    chains, _ = load_structures(structures)
    proteins, _ = load_proteins(paths.maps, chains, baseline_maps=paths.maps_random)
    # ESM's 20 training chains, fewer when the folder holds fewer (one chain at least is tested)
    train_size = min(ESM_TRAIN_PROTEINS, len(proteins) - 1)
    report = run_contacts(
        paths.maps,
        structures,
        paths.contacts,
        baseline_maps=paths.maps_random,
        train_size=train_size,
        head_train_size=train_size,
        C=ESM_C,
        seed=0,
        head_kind="mean" if align_to else "logistic",
        head_align_to=align_to,
    )
    family_chain = next(c for c in chains if Path(c.path).resolve() == Path(structure).resolve())
    held_out = leave_family_out(proteins, family_chain.key, train_size=train_size)
    return {
        "head": str(paths.head.relative_to(out)),
        "align_to": (align_to or {}).get("id", ""),
        "kind": report["contact_head"]["kind"],
        "n_proteins": report["n_proteins"],
        "contacts_report": {m: report["methods"][m]["mean"]["long"] for m in report["methods"]},
        "test_proteins": report["folds"][0]["test"],
        "leave_family_out": held_out,
    }
