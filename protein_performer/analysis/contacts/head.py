"""A contact head fitted once and reused: logistic regression on APC-corrected attention maps.

For a pair ``(i, j)`` the features are the ``layers x heads`` values ``x_f = APC(A_f + A_f^T)_ij``;
the head predicts

    p_ij = sigmoid( b + sum_f w_f (x_f - mu_f) / sigma_f )

with ``mu``, ``sigma`` the standardization fitted on the training pairs (``sigma = 1, mu = 0``
without it) and ``w`` the L1-regularized logistic weights (ESM's protocol: 20 training proteins,
L1, C = 0.15; see :mod:`protein_performer.analysis.contacts`). The map is symmetric; pairs closer
than ``min_sep`` in sequence lie outside what the head was fitted on (their values are still given).

The head is saved as JSON (``contact_head.json``, next to the contacts report) with the checkpoint's
sha256, so that :mod:`protein_performer.analysis.contacts.predict` can refuse maps of another model.
A head of a model trained on rows aligned to one reference chain (the family-contacts recipe's
``align=true``) carries that reference (``align_to``): ``predict_contacts`` then aligns every input
onto it, since the model's positions are the reference's residues.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from protein_performer import outputs
from protein_performer.errors import UserError

log = logging.getLogger(__name__)

HEAD_FORMAT = "protein_performer.contact_head"
HEAD_VERSION = 2  # 2: align_to (a head without it is written as version 1, which every reader reads)
ESM_TRAIN_PROTEINS = 20  # ESM fitted its released contact regression on 20 proteins


class ContactHeadError(UserError, ValueError):
    """A contact-head file that cannot be used (corrupt, another format, another model)."""


@dataclass
class ContactHead:
    """Logistic regression over the ``n_layers x n_heads`` APC maps of one checkpoint."""

    n_layers: int
    n_heads: int
    weights: np.ndarray  # (n_layers * n_heads,) on standardized features
    intercept: float
    mean: np.ndarray  # (n_layers * n_heads,) feature means (0 without standardization)
    scale: np.ndarray  # (n_layers * n_heads,) feature std devs (1 without standardization)
    min_sep: int = 6
    checkpoint: str = ""
    checkpoint_sha256: str = ""  # "" only for a random-init model
    training_proteins: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # C, solver, seed, standardize, threshold
    align_to: dict = field(default_factory=dict)  # {"id", "sequence"}: the model's positions are this chain's
    features: str = "apc(symmetrize(attention)) as stored in maps.h5 (float16)"

    def __post_init__(self) -> None:
        n = self.n_layers * self.n_heads
        for name in ("weights", "mean", "scale"):
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if arr.shape != (n,):
                raise ContactHeadError(f"contact head: {name} has {arr.size} values, expected layers x heads = {n}")
            setattr(self, name, arr)
        if not np.all(self.scale > 0):
            raise ContactHeadError("contact head: every feature scale must be > 0")
        if self.align_to and not str(self.align_to.get("sequence", "")):
            raise ContactHeadError("contact head: align_to needs the reference's 'sequence'")

    # -------------------------------------------------------------------------- the equation
    def affine(self) -> tuple[np.ndarray, float]:
        """``(v, c)`` with ``logit = c + sum_f v_f x_f``: the standardization folded into the weights."""
        v = self.weights / self.scale
        return v, float(self.intercept - np.dot(v, self.mean))

    def logits(self, apc_maps: np.ndarray) -> np.ndarray:
        """(L, L) float64 logits from (n_layers, n_heads, L, L) APC-corrected symmetrized maps."""
        apc_maps = np.asarray(apc_maps)
        if apc_maps.ndim != 4 or apc_maps.shape[:2] != (self.n_layers, self.n_heads):
            raise ContactHeadError(
                f"contact head fitted on {self.n_layers} layers x {self.n_heads} heads, "
                f"got maps shaped {apc_maps.shape}: use the head of this model"
            )
        v, c = self.affine()
        flat = apc_maps.reshape(len(v), apc_maps.shape[-2], apc_maps.shape[-1]).astype(np.float32)
        return np.tensordot(v, flat, axes=(0, 0)) + c  # (L, L), float64 weights promote the sum

    def predict(self, apc_maps: np.ndarray) -> np.ndarray:
        """(L, L) float32 contact probabilities, symmetric, 0 on the diagonal."""
        z = self.logits(apc_maps)
        z = 0.5 * (z + z.T)  # the maps are symmetric already; this removes rounding asymmetry
        p = 1.0 / (1.0 + np.exp(-z))
        np.fill_diagonal(p, 0.0)
        return p.astype(np.float32)

    # -------------------------------------------------------------------------- files
    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("weights", "mean", "scale"):
            d[k] = [float(x) for x in getattr(self, k)]
        # a reader older than align_to would predict on unaligned inputs: it must refuse such a head
        return {"format": HEAD_FORMAT, "version": HEAD_VERSION if self.align_to else 1, **d}

    def save(self, path: str | Path) -> Path:
        """Write the head as JSON, atomically (a killed write leaves the previous file or none)."""
        path = Path(path)
        outputs.write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        log.info(
            "contact head (%d x %d maps, %d nonzero weights) -> %s",
            self.n_layers,
            self.n_heads,
            int(np.count_nonzero(self.weights)),
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> ContactHead:
        path = Path(path)
        if path.is_dir():
            cand = path / "contact_head.json"
            if not cand.is_file():
                raise ContactHeadError(
                    f"{path}: is a directory without contact_head.json; give the head file that "
                    "`contacts` wrote (<output_dir>/contact_head.json)"
                )
            path = cand
        if not path.is_file():
            raise ContactHeadError(
                f"{path}: contact head not found; fit one with `python -m protein_performer.contacts` "
                "(it writes <output_dir>/contact_head.json)"
            )
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ContactHeadError(
                f"{path}: not a contact head (unreadable JSON: {e}); refit it with `contacts`"
            ) from e
        if not isinstance(d, dict) or d.get("format") != HEAD_FORMAT:
            raise ContactHeadError(
                f"{path}: not a contact head file (format {d.get('format') if isinstance(d, dict) else None!r}); "
                "give the contact_head.json that `contacts` wrote"
            )
        if int(d.get("version", 0)) > HEAD_VERSION:
            raise ContactHeadError(
                f"{path}: contact head version {d['version']} is newer than this protein_performer "
                f"reads ({HEAD_VERSION}); upgrade protein_performer"
            )
        keys = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        try:
            return cls(**keys)
        except (TypeError, ValueError) as e:
            raise ContactHeadError(f"{path}: incomplete contact head ({e}); refit it with `contacts`") from e

    def check_model(self, checkpoint_sha256: str, n_layers: int, n_heads: int, where: str = "") -> None:
        """Refuse a model other than the one the head was fitted on."""
        where = f"{where}: " if where else ""
        if (n_layers, n_heads) != (self.n_layers, self.n_heads):
            raise ContactHeadError(
                f"{where}the model has {n_layers} layers x {n_heads} heads, the contact head was fitted "
                f"on {self.n_layers} x {self.n_heads} ({self.checkpoint}); fit a head for this model "
                "with `contacts`"
            )
        if checkpoint_sha256 != self.checkpoint_sha256:
            raise ContactHeadError(
                f"{where}the contact head was fitted on another checkpoint ({self.checkpoint}, sha256 "
                f"{self.checkpoint_sha256[:12] or 'none'}..., this one {checkpoint_sha256[:12] or 'none'}...); "
                "fit a head on this checkpoint's maps with `contacts`"
            )


# ------------------------------------------------------------------------------ fitting
def head_from_estimator(model, n_layers: int, n_heads: int, **meta) -> ContactHead:
    """A :class:`ContactHead` from a fitted scikit-learn ``LogisticRegression`` or a
    ``StandardScaler -> LogisticRegression`` pipeline (as :func:`contacts.fit_logistic` returns)."""
    n = n_layers * n_heads
    if hasattr(model, "steps"):
        scaler, lr = model[0], model[-1]
        mean = np.asarray(scaler.mean_, dtype=np.float64)
        scale = np.asarray(scaler.scale_, dtype=np.float64)
    else:
        lr, mean, scale = model, np.zeros(n), np.ones(n)
    return ContactHead(
        n_layers,
        n_heads,
        np.asarray(lr.coef_, dtype=np.float64).reshape(-1),
        float(np.asarray(lr.intercept_).reshape(-1)[0]),
        mean,
        scale,
        **meta,
    )


def training_subset(names: Sequence[str], train_size: int | None = ESM_TRAIN_PROTEINS, seed: int = 0) -> list[int]:
    """Indices of the proteins a head is fitted on: ``train_size`` drawn by ``seed`` (all when
    ``train_size`` is None or at least the number of proteins), in their original order."""
    n = len(names)
    if train_size is None or train_size >= n:
        return list(range(n))
    if train_size < 1:
        raise ValueError(f"train_size must be >= 1, got {train_size}")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:train_size])
