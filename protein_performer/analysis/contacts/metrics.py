"""Contact scoring, the protocol of ESM (Rao et al. 2020).

- Contact: C-beta distance ``||x_i - x_j|| < 8 A`` (C-alpha for glycine); ranges by separation
  ``s = |i - j|``: short 6-11, medium 12-23, long >= 24.
- Precision at L/k: among the top ``floor(L/k)`` predicted pairs ``i < j`` of a range (unresolved
  residues excluded), the fraction that are contacts; k = 1, 2, 5 (P@L, P@L/2, P@L/5).
"""

from __future__ import annotations

import numpy as np

RANGES: dict[str, tuple[int, int | None]] = {"short": (6, 11), "medium": (12, 23), "long": (24, None)}
K_FRACS: dict[str, float] = {"P@L": 1.0, "P@L/2": 0.5, "P@L/5": 0.2}
MIN_SEP = 6  # pairs closer in sequence are never scored


def contact_map(coords: np.ndarray, threshold: float = 8.0) -> np.ndarray:
    """(L, L) float: 1.0 where ``||x_i - x_j|| < threshold``, 0.0 where not, NaN where either
    residue is unresolved (NaN coordinates). ``coords``: (L, 3) C-beta positions."""
    coords = np.asarray(coords, dtype=np.float64)
    d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    out = (d < threshold).astype(np.float64)
    out[np.isnan(d)] = np.nan
    return out


def precision_at_k(
    pred: np.ndarray, true: np.ndarray, min_sep: int = 24, max_sep: int | None = None, k_frac: float = 1.0
) -> float:
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
    return {r: {k: precision_at_k(pred, true, lo, hi, f) for k, f in K_FRACS.items()} for r, (lo, hi) in RANGES.items()}
