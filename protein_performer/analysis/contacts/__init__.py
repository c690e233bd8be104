"""Contact prediction from attention maps, the protocol of ESM (Rao et al. 2020).

- Contact: C-beta distance < 8 A (C-alpha for glycine); ranges by separation ``s = |i - j|``:
  short 6-11, medium 12-23, long >= 24.
- Precision at L/k: among the top ``floor(L/k)`` predicted pairs ``i < j`` of a range (unresolved
  residues excluded), the fraction that are contacts; k = 1, 2, 5.
- Unsupervised predictor: every map ``A`` symmetrized (``A + A^T``) and APC-corrected
  (``A - rowsum colsum / total``); the layers x heads values of a pair are its features; an L1
  logistic regression (C = 0.15) fitted on training proteins predicts the others (k-fold over
  proteins, or one train/test split). Baselines: the same pipeline on a random-init model's
  maps, and the single head with the best long-range P@L on the training proteins.

The package's public names are imported from here; the code lives in:

- :mod:`~protein_performer.analysis.maps.ops`: :func:`symmetrize`, :func:`apc`;
- :mod:`~protein_performer.analysis.contacts.metrics`: :func:`contact_map`, :func:`precision_at_k`;
- :mod:`~protein_performer.analysis.contacts.proteins`: :class:`Protein`, :func:`load_proteins`;
- :mod:`~protein_performer.analysis.contacts.study`: the predictors and :func:`evaluate`;
- :mod:`~protein_performer.analysis.contacts.report`: report files, table and plots;
- :mod:`~protein_performer.analysis.contacts.run`: :func:`run_contacts` (the entry point's work);
- :mod:`~protein_performer.analysis.contacts.head`: the saved contact head;
  :mod:`~protein_performer.analysis.contacts.predict`: ``predict_contacts`` with it (imported from there);
  :mod:`~protein_performer.analysis.contacts.tiles`: the head on row tiles of every layer's features
  (any length); :mod:`~protein_performer.analysis.contacts.plot`: :func:`plot_prediction`, a prediction's PNG;
  :mod:`~protein_performer.analysis.contacts.potts`: the head and map of an attention-Potts model.
"""

from __future__ import annotations

from protein_performer.analysis.contacts.metrics import (
    K_FRACS,
    MIN_SEP,
    RANGES,
    contact_map,
    precision_at_k,
    precision_table,
)
from protein_performer.analysis.contacts.proteins import Protein, load_proteins, pair_features
from protein_performer.analysis.contacts.report import (
    format_table,
    plot_contact_map,
    plot_precision_by_range,
    write_report,
    write_report_csv,
    write_report_json,
)
from protein_performer.analysis.contacts.run import fit_contact_head, run_contacts
from protein_performer.analysis.contacts.study import best_head, coefficients, evaluate, fit_logistic, folds_for
from protein_performer.analysis.maps.ops import apc, symmetrize

__all__ = [
    "K_FRACS",
    "MIN_SEP",
    "RANGES",
    "Protein",
    "apc",
    "best_head",
    "coefficients",
    "contact_map",
    "evaluate",
    "fit_contact_head",
    "fit_logistic",
    "folds_for",
    "format_table",
    "load_proteins",
    "pair_features",
    "plot_contact_map",
    "plot_precision_by_range",
    "precision_at_k",
    "precision_table",
    "run_contacts",
    "symmetrize",
    "write_report",
    "write_report_csv",
    "write_report_json",
]
