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

:func:`evaluate` runs it all and returns the report; :func:`write_report` writes JSON, CSV and
plots.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from protein_performer.analysis import atomic
from protein_performer.analysis.contact_head import (
    ESM_TRAIN_PROTEINS, ContactHead, head_from_estimator, training_subset,
)
from protein_performer.analysis.maps_io import MapsFile, MapsRecord
from protein_performer.analysis.structures import (
    STRUCTURE_SUFFIXES, AlignmentMismatchError, Chain, LoadFailure, MissingStructuresError, StructureError,
    align_to_sequence, coords_on_sequence, file_stem, load_structures, structure_files,
)
from protein_performer.errors import UserError

log = logging.getLogger(__name__)

RANGES: dict[str, tuple[int, int | None]] = {"short": (6, 11), "medium": (12, 23), "long": (24, None)}
K_FRACS: dict[str, float] = {"P@L": 1.0, "P@L/2": 0.5, "P@L/5": 0.2}
MIN_SEP = 6


def _l1_kwargs() -> dict:
    """scikit-learn >= 1.8 spells the L1 penalty ``l1_ratio=1`` (``penalty`` is deprecated)."""
    import sklearn

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


# ------------------------------------------------------------------------------ the equations
def contact_map(coords: np.ndarray, threshold: float = 8.0) -> np.ndarray:
    """(L, L) float: 1.0 where ``||x_i - x_j|| < threshold``, 0.0 where not, NaN where either
    residue is unresolved (NaN coordinates). ``coords``: (L, 3) C-beta positions."""
    coords = np.asarray(coords, dtype=np.float64)
    d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    out = (d < threshold).astype(np.float64)
    out[np.isnan(d)] = np.nan
    return out


def symmetrize(a: np.ndarray) -> np.ndarray:
    """``A + A^T`` over the last two axes of a (..., L, L) array."""
    a = np.asarray(a)
    return a + np.swapaxes(a, -1, -2)


def apc(a: np.ndarray) -> np.ndarray:
    """Average product correction over the last two axes:
    ``A_ij - (sum_k A_ik)(sum_k A_kj) / sum_kl A_kl`` (Dunn et al. 2008, as in ESM)."""
    a = np.asarray(a)
    a = a.astype(np.float64 if a.dtype == np.float64 else np.float32, copy=False)
    rows = a.sum(-1, keepdims=True)
    cols = a.sum(-2, keepdims=True)
    total = a.sum((-1, -2), keepdims=True)
    total = np.where(total == 0, 1.0, total)
    return a - rows * cols / total


def precision_at_k(pred: np.ndarray, true: np.ndarray, min_sep: int = 24, max_sep: int | None = None,
                   k_frac: float = 1.0) -> float:
    """Precision of the top ``floor(L * k_frac)`` pairs ``i < j`` with ``min_sep <= j - i <=
    max_sep`` ranked by ``pred`` (k_frac 1, 1/2, 1/5 gives P@L, P@L/2, P@L/5). Pairs where
    ``true`` is NaN (unresolved) or ``pred`` is not finite are excluded; with fewer valid pairs
    than asked, all valid pairs are taken. Pairs tied at the cut-off contribute their mean label
    (the expected precision under random tie-breaking). NaN when no pair is valid.
    ``true``: contact_map."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    L = true.shape[0]
    i, j = np.triu_indices(L, k=max(min_sep, 1))
    sep = j - i
    keep = np.ones(len(i), dtype=bool) if max_sep is None else sep <= max_sep
    p, t = pred[i[keep], j[keep]], true[i[keep], j[keep]]
    valid = ~np.isnan(t) & np.isfinite(p)
    p, t = p[valid], t[valid]
    if not len(p):
        return float("nan")
    n = min(max(int(np.floor(L * k_frac + 1e-9)), 1), len(p))
    # ties at the cut-off count with their mean label: the expectation under random tie-breaking,
    # so a constant predictor scores exactly the contact density instead of favouring early rows
    cut = np.partition(p, len(p) - n)[len(p) - n]
    above, tied = p > cut, p == cut
    return float((t[above].sum() + (n - above.sum()) * t[tied].mean()) / n)


def precision_table(pred: np.ndarray, true: np.ndarray) -> dict[str, dict[str, float]]:
    """``{range: {"P@L": ., "P@L/2": ., "P@L/5": .}}`` for the short, medium and long ranges."""
    return {r: {k: precision_at_k(pred, true, lo, hi, f) for k, f in K_FRACS.items()}
            for r, (lo, hi) in RANGES.items()}


# ------------------------------------------------------------------------------ proteins
@dataclass
class Protein:
    """A chain paired with its maps: the true contacts and the pair features of each map set."""

    name: str
    source: str
    sequence: str
    true: np.ndarray                          # (L, L) contact_map on the sequence's positions
    i: np.ndarray                             # (P,) pairs i < j with j - i >= MIN_SEP
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


def _apc_of(rec: MapsRecord, path: Path) -> np.ndarray:
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


def load_proteins(maps: str | Path, chains: Sequence[Chain], baseline_maps: str | Path | None = None,
                  wanted: Sequence[str] | None = None, threshold: float = 8.0, min_identity: float = 0.9,
                  max_mismatches: int = 3) -> tuple[list[Protein], list[LoadFailure]]:
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
                    failures.append(LoadFailure(rec.source or rec.id, None,
                                                f"{maps} record {rec.id}: no structure chain matches "
                                                f"source {rec.source!r} or id {rec.id!r}"))
                    log.warning("%s", failures[-1].reason)
                continue
            if not _selected(chain, wanted_set):
                continue
            used.add(chain.key)
            try:
                aln = align_to_sequence(chain, rec.sequence, min_identity, max_mismatches)
                true = contact_map(coords_on_sequence(chain, aln), threshold)
                i, j = np.triu_indices(len(rec.sequence), k=MIN_SEP)
                prot = Protein(chain.name, chain.key, rec.sequence, true, i, j, alignment=aln.as_dict())
                a = _apc_of(rec, maps)
                prot.features["trained"] = pair_features(a, i, j)
                prot.n_heads["trained"] = tuple(a.shape[:2])
            except (AlignmentMismatchError, ValueError) as e:
                failures.append(LoadFailure(chain.path, chain.chain_id, str(e)))
                log.warning("%s", e)
                continue
            proteins.append(prot)
    if wanted_set is not None:
        for w in sorted(wanted_set):
            if not any(_selected(c, {w}) for c in chains):
                failures.append(LoadFailure(w, None, f"chains: {w!r} names no chain of the structures read"))
                log.warning("%s", failures[-1].reason)
        for c in chains:
            if _selected(c, wanted_set) and c.key not in used:
                failures.append(LoadFailure(c.path, c.chain_id, f"{c.path} chain {c.chain_id}: no record "
                                            f"in {maps} (source {c.key!r} or id {c.name!r})"))
                log.warning("%s", failures[-1].reason)
    if baseline_maps is not None:
        _add_baseline(proteins, Path(baseline_maps), failures)
    log.info("%d proteins ready, %d failures", len(proteins), len(failures))
    return proteins, failures


def _add_baseline(proteins: list[Protein], path: Path, failures: list[LoadFailure]) -> None:
    with MapsFile(path) as mf:
        for p in proteins:
            rid = mf.find(p.source, p.name)
            if rid is None:
                failures.append(LoadFailure(p.source, None, f"{path}: no baseline record for {p.name}"))
                log.warning("%s", failures[-1].reason)
                continue
            rec = mf.read(rid, load=("attentions", "apc"))
            if rec.sequence.upper() != p.sequence.upper():
                failures.append(LoadFailure(p.source, None, f"{path} record {rid}: sequence differs from "
                                            f"the trained model's maps; baseline skipped for {p.name}"))
                log.warning("%s", failures[-1].reason)
                continue
            a = _apc_of(rec, path)
            p.features["random_init"] = pair_features(a, p.i, p.j)
            p.n_heads["random_init"] = tuple(a.shape[:2])


# ------------------------------------------------------------------------------ predictors
def _long_p_at_l_per_head(proteins: Sequence[Protein], key: str) -> np.ndarray:
    """(F,) mean over proteins of long-range P@L of each feature column used alone."""
    lo = RANGES["long"][0]
    scores = []
    for p in proteins:
        y = p.y
        m = (p.j - p.i >= lo) & ~np.isnan(y)
        if not m.any():
            continue
        x, yy = p.features[key][m], y[m]
        n = min(p.L, len(yy))
        top = np.argsort(-x, axis=0, kind="stable")[:n]        # (n, F)
        scores.append(yy[top].mean(0))
    return np.mean(scores, axis=0)


def best_head(proteins: Sequence[Protein], key: str) -> int:
    """Index (layer * heads + head) of the map with the best mean long-range P@L."""
    return int(np.argmax(_long_p_at_l_per_head(proteins, key)))


def fit_logistic(proteins: Sequence[Protein], key: str, C: float = 0.15, solver: str = "liblinear",
                 seed: int = 0, standardize: bool = True):
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


def folds_for(n: int, n_folds: int = 5, train_size: int | None = None,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
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
    return [(np.sort(np.concatenate(parts[:f] + parts[f + 1:])), np.sort(parts[f])) for f in range(k)]


def evaluate(proteins: Sequence[Protein], n_folds: int = 5, train_size: int | None = None,
             C: float = 0.15, solver: str = "liblinear", seed: int = 0, standardize: bool = True) -> dict:
    """Cross-validated precision of every method on every protein; returns the report dict
    (``methods[m]["per_protein"][name][range][k]``, ``methods[m]["mean"][range][k]``) and, in
    ``predictions[m][name]``, the (L, L) predicted matrices."""
    if len(proteins) < 2:
        raise ValueError(f"contact evaluation needs at least 2 proteins, got {len(proteins)}")
    keys = [k for k in ("trained", "random_init") if all(k in p.features for p in proteins)]
    if "random_init" not in keys and any("random_init" in p.features for p in proteins):
        log.warning("random-init maps missing for some proteins: that baseline is skipped")
    methods = {}
    for k in keys:
        methods[k] = "logistic"
        methods[f"{k}_best_head"] = "best_head"
    per: dict[str, dict[str, dict]] = {m: {} for m in methods}
    preds: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    fold_info = []
    splits = folds_for(len(proteins), n_folds, train_size, seed)
    for f, (tr, te) in enumerate(splits):
        train = [proteins[t] for t in tr]
        info = {"fold": f, "train": [proteins[t].name for t in tr], "test": [proteins[t].name for t in te]}
        for k in keys:
            model = fit_logistic(train, k, C, solver, seed, standardize)
            h = best_head(train, k)
            n_layers, n_heads = proteins[0].n_heads[k]
            info[f"{k}_best_head"] = {"layer": h // n_heads, "head": h % n_heads, "index": h}
            info[f"{k}_nonzero_weights"] = int(np.count_nonzero(coefficients(model)))
            for t in te:
                p = proteins[t]
                for m, scores in ((k, model.predict_proba(p.features[k])[:, 1]),
                                  (f"{k}_best_head", p.features[k][:, h])):
                    pred = p.pred_matrix(scores)
                    preds[m][p.name] = pred
                    per[m][p.name] = precision_table(pred, p.true)
        fold_info.append(info)
        log.info("fold %d/%d done (%d train, %d test)", f + 1, len(splits), len(tr), len(te))
    report = {"methods": {}, "folds": fold_info, "predictions": preds}
    for m, kind in methods.items():
        mean = {r: {k: _nanmean([per[m][n][r][k] for n in per[m]]) for k in K_FRACS} for r in RANGES}
        report["methods"][m] = {"kind": kind, "mean": mean, "per_protein": per[m]}
    report["proteins"] = [_protein_summary(p) for p in proteins]
    report["contact_density"] = {r: _nanmean([_density(p, lo, hi) for p in proteins])
                                 for r, (lo, hi) in RANGES.items()}
    return report


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
    return {"name": p.name, "source": p.source, "L": p.L, "n_resolved": n_res,
            "n_contacts": {r: int(np.nansum(p.y[(sep >= lo) & ((sep <= hi) if hi else True)]))
                           for r, (lo, hi) in RANGES.items()},
            "alignment": p.alignment}


# ------------------------------------------------------------------------------ output
def run_contacts(maps: str | Path, structures: str | Path, output_dir: str | Path,
                 baseline_maps: str | Path | None = None, chains: Sequence[str] | None = None,
                 min_residues: int = 30, threshold: float = 8.0, min_identity: float = 0.9,
                 max_mismatches: int = 3, n_folds: int = 5, train_size: int | None = None,
                 C: float = 0.15, solver: str = "liblinear", seed: int = 0, n_plots: int = 4,
                 standardize: bool = True, save_head: bool = True,
                 head_train_size: int | None = ESM_TRAIN_PROTEINS) -> dict:
    """Everything the ``contacts`` entry point does: load, evaluate, write the report and plots.
    With ``save_head`` it also fits the contact head once, on ``head_train_size`` proteins drawn by
    ``seed`` (ESM's protocol: 20; all when None or fewer), and saves it as
    ``<output_dir>/contact_head.json`` for ``predict_contacts``. Returns the report (without the
    prediction matrices)."""
    all_chains, failures = _read_structures(structures, min_residues)
    proteins, more = load_proteins(maps, all_chains, baseline_maps, chains, threshold, min_identity,
                                   max_mismatches)
    failures = failures + more
    if len(proteins) < 2:
        why = f"; first failure: {failures[0].reason}" if failures else ""
        raise UserError(f"{maps}: only {len(proteins)} of its records match a chain of {structures} (contact "
                        f"evaluation needs at least 2){why}; export the maps from these structures "
                        "(export_attention input=<structure folder>)")
    report = evaluate(proteins, n_folds, train_size, C, solver, seed, standardize)
    preds = report.pop("predictions")
    report = {"maps": str(maps), "baseline_maps": str(baseline_maps) if baseline_maps else None,
              "structures": str(structures), "n_proteins": len(proteins),
              "settings": {"threshold": threshold, "min_sep": MIN_SEP, "ranges": RANGES, "C": C,
                           "solver": solver, "n_folds": n_folds, "train_size": train_size, "seed": seed,
                           "min_identity": min_identity, "max_mismatches": max_mismatches},
              **report, "failures": [f.as_dict() for f in failures]}
    head = fit_contact_head(proteins, maps, C, solver, seed, standardize, head_train_size) if save_head else None
    if head is not None:
        report["contact_head"] = {"file": "contact_head.json", "training_proteins": head.training_proteins,
                                  "nonzero_weights": int(np.count_nonzero(head.weights)),
                                  "checkpoint_sha256": head.checkpoint_sha256}
    # report.json is written last: a run killed on the way leaves none (an old one is removed first),
    # so its presence means the CSV and plots of the same run are complete; every file is atomic
    out = Path(output_dir)
    _prepare_output_dir(out)
    (out / "report.json").unlink(missing_ok=True)
    write_report_csv(report, out)
    plot_precision_by_range(report, out / "precision_by_range.png")
    for p in proteins[:n_plots]:
        plot_contact_map(p, {m: preds[m][p.name] for m in preds if p.name in preds[m]},
                         out / "contact_maps" / f"{p.name}.png")
    if head is not None:
        head.save(out / "contact_head.json")
    write_report_json(report, out)
    return report


def fit_contact_head(proteins: Sequence[Protein], maps: str | Path, C: float = 0.15, solver: str = "liblinear",
                     seed: int = 0, standardize: bool = True,
                     train_size: int | None = ESM_TRAIN_PROTEINS) -> ContactHead:
    """The contact head of the model whose ``maps`` these are: the L1 logistic regression of
    :func:`fit_logistic` on ``train_size`` proteins drawn by ``seed``, with the checkpoint's sha256."""
    idx = training_subset([p.name for p in proteins], train_size, seed)
    train = [proteins[i] for i in idx]
    model = fit_logistic(train, "trained", C, solver, seed, standardize)
    with MapsFile(maps) as mf:
        sha = mf.attrs["checkpoint_sha256"]
        checkpoint = mf.export_info.get("checkpoint", "")
    n_layers, n_heads = proteins[0].n_heads["trained"]
    return head_from_estimator(model, n_layers, n_heads, min_sep=MIN_SEP, checkpoint=str(checkpoint),
                               checkpoint_sha256=sha, training_proteins=[p.name for p in train],
                               settings={"C": C, "solver": solver, "seed": seed, "standardize": standardize,
                                         "train_size": train_size, "maps": str(maps)})


def _read_structures(structures: str | Path, min_residues: int) -> tuple[list[Chain], list[LoadFailure]]:
    """The chains of ``structures`` (a folder or one file); a clear error when none can be read."""
    path = Path(structures)
    if not path.exists():
        raise MissingStructuresError(f"structures not found: {path}")
    if path.is_dir() and not structure_files(path):
        raise StructureError(f"{path}: no structure files ({', '.join(STRUCTURE_SUFFIXES)}) in this folder; "
                             "give the folder of PDB / mmCIF files the maps were exported from")
    chains, failures = load_structures(path, min_residues=min_residues)
    if not chains:
        why = failures[0].reason if failures else f"no protein chain with >= {min_residues} standard residues"
        raise StructureError(f"{path}: no usable structure chain ({why}); give PDB / mmCIF files "
                             "(structures= is a folder of them, or one file)")
    return chains, failures


def _prepare_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, but output_dir= must be a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise UserError(f"{out}: not writable (permission denied); choose a writable output_dir")


def write_report(report: dict, output_dir: str | Path) -> None:
    """``report.csv`` then ``report.json`` (each written atomically)."""
    write_report_csv(report, output_dir)
    write_report_json(report, output_dir)


def write_report_json(report: dict, output_dir: str | Path) -> None:
    """``report.json``, written under a temporary name and renamed when complete."""
    atomic.write_text(Path(output_dir) / "report.json", json.dumps(_jsonable(report), indent=1))
    log.info("wrote %s", Path(output_dir) / "report.json")


def write_report_csv(report: dict, output_dir: str | Path) -> None:
    """``report.csv`` (method, protein, L, range, k, precision; MEAN rows), atomically."""
    out = Path(output_dir)
    lengths = {p["name"]: p["L"] for p in report["proteins"]}
    with atomic.atomic_output(out / "report.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "protein", "L", "range", "k", "precision"])
        for m, res in report["methods"].items():
            for name, table in list(res["per_protein"].items()) + [("MEAN", res["mean"])]:
                for r, ks in table.items():
                    for k, v in ks.items():
                        w.writerow([m, name, lengths.get(name, ""), r, k, f"{v:.4f}"])
    log.info("wrote %s", out / "report.csv")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def format_table(report: dict) -> str:
    """A plain-text table of mean precision by method and range."""
    cols = [(r, k) for r in RANGES for k in ("P@L", "P@L/5")]
    head = f"{'method':<24}" + "".join(f"{r + ' ' + k:>14}" for r, k in cols)
    lines = [head, "-" * len(head)]
    for m, res in report["methods"].items():
        lines.append(f"{m:<24}" + "".join(f"{res['mean'][r][k]:>14.3f}" for r, k in cols))
    dens = report.get("contact_density", {})
    if dens:
        lines.append(f"{'(contact density)':<24}" + "".join(f"{dens[r]:>14.3f}" for r, _ in cols))
    return "\n".join(lines)


def plot_precision_by_range(report: dict, path: str | Path) -> None:
    """Bar chart: mean P@L and P@L/5 per range, one bar per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    x = np.arange(len(RANGES))
    w = 0.8 / max(len(methods), 1)
    for ax, k in zip(axes, ("P@L", "P@L/5")):
        for n, m in enumerate(methods):
            vals = [report["methods"][m]["mean"][r][k] for r in RANGES]
            ax.bar(x + n * w - 0.4 + w / 2, np.nan_to_num(vals), w, label=m)
        dens = [report.get("contact_density", {}).get(r, np.nan) for r in RANGES]
        ax.scatter(x, dens, marker="_", s=400, color="k", label="contact density", zorder=3)
        ax.set_xticks(x, list(RANGES))
        ax.set_title(k)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("precision")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle(f"contact precision, {report.get('n_proteins', '?')} proteins")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    try:
        atomic.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def plot_contact_map(protein: Protein, preds: dict[str, np.ndarray], path: str | Path) -> None:
    """True contacts (grey, lower triangle) against the top-L predictions (upper triangle: blue
    correct, red wrong), one panel per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = protein.L
    n = max(len(preds), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    ti, tj = np.nonzero(np.tril(np.nan_to_num(protein.true), -MIN_SEP))
    for ax, (m, pred) in zip(axes[0], preds.items()):
        ax.scatter(tj, ti, s=3, c="0.6", marker="s", linewidths=0)
        iu, ju = np.triu_indices(L, MIN_SEP)
        sc = pred[iu, ju]
        ok = np.isfinite(sc) & ~np.isnan(protein.true[iu, ju])
        tiebreak = np.random.default_rng(0).random(len(sc))  # a constant predictor: no row bias
        top = np.lexsort((tiebreak, -np.where(ok, sc, -np.inf)))[:L]
        top = top[ok[top]]
        hit = protein.true[iu[top], ju[top]] > 0
        ax.scatter(ju[top][hit], iu[top][hit], s=5, c="tab:blue", marker="o", linewidths=0)
        ax.scatter(ju[top][~hit], iu[top][~hit], s=5, c="tab:red", marker="o", linewidths=0)
        ax.set_xlim(0, L)
        ax.set_ylim(L, 0)
        ax.set_aspect("equal")
        ax.set_title(f"{m}\nlong P@L {precision_at_k(pred, protein.true, 24, None, 1.0):.2f}", fontsize=8)
    fig.suptitle(protein.name, fontsize=9)
    fig.tight_layout()
    try:
        atomic.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
