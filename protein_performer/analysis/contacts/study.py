"""Contact study, the predictors and their cross-validated precision (ESM's unsupervised protocol).

- Features of a pair: the layers x heads values of ``APC(A + A^T)`` (:mod:`~protein_performer.analysis.contacts.proteins`).
- Logistic: an L1 logistic regression (C = 0.15), ``p(contact) = sigmoid(w . x + b)``, fitted on
  the resolved pairs of training proteins (features standardized first), predicts the others.
- Best head: the single map with the best mean long-range P@L on the training proteins.
- Mean of heads: the mean over all layers x heads of the features, nothing fitted (the
  unsupervised map of a factored family model, whose heads together form its couplings).
- Folds: k-fold over proteins (every protein predicted by a model that did not see it), or one
  train/test split. Each method runs on every map set ("trained", "random_init" baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from protein_performer.analysis.contacts.metrics import K_FRACS, RANGES, precision_table
from protein_performer.analysis.contacts.proteins import RANDOM_INIT, TRAINED, Protein

log = logging.getLogger(__name__)

LONG_RANGE_MIN_SEP = RANGES["long"][0]


def _l1_kwargs() -> dict:
    """scikit-learn >= 1.8 spells the L1 penalty ``l1_ratio=1`` (``penalty`` is deprecated)."""
    import sklearn

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def _long_p_at_l_per_head(proteins: Sequence[Protein], key: str) -> np.ndarray:
    """(F,) mean over proteins of long-range P@L of each feature column used alone."""
    scores = []
    for p in proteins:
        y = p.y
        m = (p.j - p.i >= LONG_RANGE_MIN_SEP) & ~np.isnan(y)
        if not m.any():
            continue
        x, labels = p.features[key][m], y[m]
        n = min(p.L, len(labels))
        top = np.argsort(-x, axis=0, kind="stable")[:n]  # (n, F)
        scores.append(labels[top].mean(0))
    return np.mean(scores, axis=0)


def best_head(proteins: Sequence[Protein], key: str) -> int:
    """Index (layer * heads + head) of the map with the best mean long-range P@L."""
    return int(np.argmax(_long_p_at_l_per_head(proteins, key)))


def mean_of_heads(features: np.ndarray) -> np.ndarray:
    """(P,) float64: each pair's mean over the layers x heads features (P, F)."""
    return np.asarray(features, dtype=np.float64).mean(1)


def fit_mean_calibration(proteins: Sequence[Protein], key: str, seed: int = 0) -> tuple[float, float]:
    """``(a, b)`` of ``p(contact) = sigmoid(a * mean_of_heads(x) + b)`` fitted (one feature,
    unpenalized logistic regression) on the resolved pairs of ``proteins``: the probabilities of
    the mean-of-heads map, whose ranking (and so its precision) the calibration does not change."""
    from sklearn.linear_model import LogisticRegression

    xs, ys = [], []
    for p in proteins:
        m = ~np.isnan(p.y)
        xs.append(mean_of_heads(p.features[key][m]))
        ys.append(p.y[m])
    x, y = np.concatenate(xs)[:, None], np.concatenate(ys).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError(f"training pairs of map set {key!r} hold a single class; need more proteins")
    sd = float(x.std()) or 1.0  # the fit on a unit-scale feature, then back to the raw one
    model = LogisticRegression(C=1e6, solver="lbfgs", max_iter=1000, random_state=seed).fit(x / sd, y)
    return float(model.coef_[0, 0]) / sd, float(model.intercept_[0])


def fit_logistic(
    proteins: Sequence[Protein],
    key: str,
    C: float = 0.15,
    solver: str = "liblinear",
    seed: int = 0,
    standardize: bool = True,
):
    """L1 logistic regression on the resolved pairs of ``proteins`` (features of map set ``key``).

    ``standardize`` (default) scales every feature (map) to zero mean and unit variance on the
    training pairs first. Without it, APC-corrected maps of a small model are ~1e-3 in size and
    the L1 penalty at C = 0.15 drives every weight to zero, i.e. a constant predictor (ESM fitted
    on raw maps of a 33-layer model, whose many heads carry enough mass to escape that).
    Returns an estimator with ``predict_proba``; its coefficients are ``coefficients(model)``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs, ys = [], []
    for p in proteins:
        y = p.y
        m = ~np.isnan(y)
        xs.append(p.features[key][m])
        ys.append(y[m])
    x, y = np.concatenate(xs), np.concatenate(ys).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError(f"training pairs of map set {key!r} hold a single class; need more proteins")
    model = LogisticRegression(C=C, solver=solver, max_iter=1000, random_state=seed, **_l1_kwargs())
    if standardize:
        model = make_pipeline(StandardScaler(), model)
    model.fit(x, y)
    return model


def coefficients(model) -> np.ndarray:
    """The logistic weights of a model from :func:`fit_logistic` (plain or standardized)."""
    return model[-1].coef_ if hasattr(model, "steps") else model.coef_


def folds_for(
    n: int, n_folds: int = 5, train_size: int | None = None, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` protein indices: one split with ``train_size`` training proteins, or
    k-fold (``min(n_folds, n)`` folds) so every protein is predicted once, by a model that did not
    see it. Order shuffled by ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    if train_size is not None:
        if not 0 < train_size < n:
            raise ValueError(f"train_size {train_size} must be in [1, {n - 1}] for {n} proteins")
        return [(np.sort(order[:train_size]), np.sort(order[train_size:]))]
    k = min(n_folds, n)
    if k < 2:
        raise ValueError(f"need at least 2 proteins for cross-validation, got {n}")
    parts = np.array_split(order, k)
    return [(np.sort(np.concatenate(parts[:f] + parts[f + 1 :])), np.sort(parts[f])) for f in range(k)]


def evaluate(
    proteins: Sequence[Protein],
    n_folds: int = 5,
    train_size: int | None = None,
    C: float = 0.15,
    solver: str = "liblinear",
    seed: int = 0,
    standardize: bool = True,
) -> dict:
    """Cross-validated precision of every method on every protein; returns the report dict
    (``methods[m]["per_protein"][name][range][k]``, ``methods[m]["mean"][range][k]``) and, in
    ``predictions[m][name]``, the (L, L) predicted matrices."""
    if len(proteins) < 2:
        raise ValueError(f"contact evaluation needs at least 2 proteins, got {len(proteins)}")
    keys = [k for k in (TRAINED, RANDOM_INIT) if all(k in p.features for p in proteins)]
    if RANDOM_INIT not in keys and any(RANDOM_INIT in p.features for p in proteins):
        log.warning("random-init maps missing for some proteins: that baseline is skipped")
    methods = {}
    for k in keys:
        methods[k] = "logistic"
        methods[f"{k}_best_head"] = "best_head"
        methods[f"{k}_mean"] = "mean_of_heads"
    per: dict[str, dict[str, dict]] = {m: {} for m in methods}
    preds: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    fold_info = []
    splits = folds_for(len(proteins), n_folds, train_size, seed)
    for fold, (train_idx, test_idx) in enumerate(splits):
        fold_info.append(_run_fold(proteins, fold, train_idx, test_idx, keys, per, preds, C, solver, seed, standardize))
        log.info("fold %d/%d done (%d train, %d test)", fold + 1, len(splits), len(train_idx), len(test_idx))
    report = {"methods": {}, "folds": fold_info, "predictions": preds}
    for m, kind in methods.items():
        mean = {r: {k: _nanmean([per[m][n][r][k] for n in per[m]]) for k in K_FRACS} for r in RANGES}
        report["methods"][m] = {"kind": kind, "mean": mean, "per_protein": per[m]}
    report["proteins"] = [_protein_summary(p) for p in proteins]
    report["contact_density"] = {r: _nanmean([_density(p, lo, hi) for p in proteins]) for r, (lo, hi) in RANGES.items()}
    return report


def _run_fold(
    proteins: Sequence[Protein],
    fold: int,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    keys: Sequence[str],
    per: dict[str, dict],
    preds: dict[str, dict],
    C: float,
    solver: str,
    seed: int,
    standardize: bool,
) -> dict:
    """Fit both methods of each map set on the fold's training proteins and score its test
    proteins into ``per`` (precision tables) and ``preds`` (matrices); returns the fold's info."""
    train = [proteins[t] for t in train_idx]
    info = {"fold": fold, "train": [proteins[t].name for t in train_idx], "test": [proteins[t].name for t in test_idx]}
    for k in keys:
        model = fit_logistic(train, k, C, solver, seed, standardize)
        head = best_head(train, k)
        n_layers, n_heads = proteins[0].n_heads[k]
        info[f"{k}_best_head"] = {"layer": head // n_heads, "head": head % n_heads, "index": head}
        info[f"{k}_nonzero_weights"] = int(np.count_nonzero(coefficients(model)))
        for t in test_idx:
            p = proteins[t]
            for m, scores in (
                (k, model.predict_proba(p.features[k])[:, 1]),
                (f"{k}_best_head", p.features[k][:, head]),
                (f"{k}_mean", mean_of_heads(p.features[k])),
            ):
                pred = p.pred_matrix(scores)
                preds[m][p.name] = pred
                per[m][p.name] = precision_table(pred, p.true)
    return info


def _nanmean(xs) -> float:
    xs = np.asarray(xs, dtype=np.float64)
    return float(np.nanmean(xs)) if np.isfinite(xs).any() else float("nan")


def _density(p: Protein, lo: int, hi: int | None) -> float:
    sep = p.j - p.i
    y = p.y[(sep >= lo) & ((sep <= hi) if hi is not None else True)]
    y = y[~np.isnan(y)]
    return float(y.mean()) if len(y) else float("nan")


def _protein_summary(p: Protein) -> dict:
    n_res = int((~np.isnan(np.diag(p.true))).sum())
    sep = p.j - p.i
    return {
        "name": p.name,
        "source": p.source,
        "L": p.L,
        "n_resolved": n_res,
        "n_contacts": {
            r: int(np.nansum(p.y[(sep >= lo) & ((sep <= hi) if hi else True)])) for r, (lo, hi) in RANGES.items()
        },
        "alignment": p.alignment,
    }
