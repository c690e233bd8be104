"""Contact maps of an attention-Potts model (:mod:`protein_performer.model.attention_potts`, the
family-contacts tool's default): its head and its map for ``predict_contacts``.

The model's couplings are over its query's columns, the same whatever the input: the map is APC of
the symmetrized Frobenius norms of its couplings placed on the query's positions (pairs with a
column the gap filter dropped have no score). The head (:func:`query_head`) is the z-score of that
map over the pairs ``|i - j| >= min_sep``, ``logit = z - 3`` (a ranking rather than a calibrated
probability, as the tool's head for the LM); ``predict_contacts`` aligns each input onto the query
(the head's ``align_to``) and reads its pairs off the query's map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein_performer.analysis.contacts.head import ContactHead, ContactHeadError
from protein_performer.analysis.maps.ops import apc
from protein_performer.model.attention_potts import AttentionPotts, load
from protein_performer.pretrained import file_sha256

FEATURES = "apc(symmetrized Frobenius norms of the couplings) of an attention-Potts model"


@dataclass(frozen=True)
class LoadedPotts:
    """An attention-Potts model read from ``checkpoint``, with its query and the query position of
    each of its columns."""

    model: AttentionPotts
    query_id: str
    query: str
    positions: np.ndarray
    checkpoint: str
    sha256: str


def load_potts(checkpoint: str | Path) -> LoadedPotts:
    """The model :func:`protein_performer.model.attention_potts.save` wrote with its query."""
    try:
        model, extra = load(checkpoint)
    except (OSError, ValueError, RuntimeError) as e:
        raise ContactHeadError(f"{checkpoint}: the head is an attention-Potts model's, this is not one ({e})") from e
    positions = np.asarray(extra["positions"], dtype=np.int64)
    return LoadedPotts(
        model, str(extra["query_id"]), str(extra["query"]), positions, str(checkpoint), file_sha256(checkpoint)
    )


def is_potts_head(head: ContactHead) -> bool:
    """Whether ``head`` reads an attention-Potts model (not attention maps)."""
    return head.features == FEATURES


def query_scores(loaded: LoadedPotts) -> np.ndarray:
    """(L, L) float64 over the query: the APC'd coupling map, NaN at pairs off the model's columns."""
    length = len(loaded.query)
    out = np.full((length, length), np.nan)
    out[np.ix_(loaded.positions, loaded.positions)] = apc(loaded.model.coupling_norms())
    np.fill_diagonal(out, np.nan)
    return out


def query_head(loaded: LoadedPotts, min_sep: int, intercept: float) -> ContactHead:
    """The z-score head of the model's map over its pairs ``|i - j| >= min_sep`` (logit ``z + intercept``)."""
    scores = query_scores(loaded)
    i, j = np.triu_indices(len(loaded.query), k=min_sep)
    v = scores[i, j][np.isfinite(scores[i, j])]
    mu, sigma = (float(v.mean()), float(v.std())) if v.size else (0.0, 0.0)
    return ContactHead(
        1,
        1,
        weights=np.ones(1),
        intercept=intercept,
        mean=np.full(1, mu),
        scale=np.full(1, sigma if sigma > 0 else 1.0),
        min_sep=min_sep,
        checkpoint=loaded.checkpoint,
        checkpoint_sha256=loaded.sha256,
        training_proteins=[loaded.query_id],
        settings={"kind": "query z-score of the attention-Potts coupling map", "intercept": intercept},
        align_to={"id": loaded.query_id, "sequence": loaded.query},
        features=FEATURES,
    )


def probabilities(head: ContactHead, loaded: LoadedPotts) -> np.ndarray:
    """(L, L) float32 over the query: ``sigmoid`` of the head's logits of the map, 0 where it has none."""
    v, c = head.affine()
    scores = query_scores(loaded)
    p = 1.0 / (1.0 + np.exp(-(c + v[0] * np.nan_to_num(scores))))
    return np.where(np.isfinite(scores), p, 0.0).astype(np.float32)
