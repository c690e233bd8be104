"""Which amino acids attend to which: attention aggregated over amino-acid pairs, against BLOSUM62.

For a set of sequences (the Performer paper used 800) and every map ``A`` (row i: the attention of
residue i), the attention mass between amino-acid types is

    O[a, b] = sum_seq sum_{i: x_i = a} sum_{j != i: x_j = b} A[i, j]

and the mass expected if each residue spread its attention over the other residues of its
sequence without regard to their type is

    E[a, b] = sum_seq sum_{i: x_i = a} r_i (n_b - [x_i = b]) / (L - 1),   r_i = sum_{j != i} A[i, j],

with ``n_b`` the count of type b in the sequence. The similarity is the symmetrized log-odds
``S = log2((O + O^T) / (E + E^T))``: 0 everywhere for attention blind to residue type (uniform
attention gives exactly 0), positive for pairs attended more than their frequencies explain.
:func:`blosum_correlation` correlates S with BLOSUM62 over the 190 pairs of distinct amino acids.
Residues outside the 20 standard ones are left out (their rows and columns).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from protein_performer import outputs
from protein_performer.analysis.maps import MapsRecord
from protein_performer.analysis.rerun import check_output_dir, finished_report, input_stamp, jsonable, staged_output
from protein_performer.errors import UserError

log = logging.getLogger(__name__)

STANDARD_AA = "ACDEFGHIKLMNPQRSTVWY"
REPORT_FILE = "aa_similarity.json"
# what a run writes into output_dir (anything else there is kept by a rerun)
OUTPUTS = frozenset({REPORT_FILE, "aa_similarity.csv", "aa_similarity.png"})
_AA_INDEX = np.full(256, -1, dtype=np.int64)
for _k, _c in enumerate(STANDARD_AA):
    _AA_INDEX[ord(_c)] = _k


def blosum62() -> np.ndarray:
    """(20, 20) BLOSUM62 in ``STANDARD_AA`` order (Bio.Align.substitution_matrices)."""
    from Bio.Align import substitution_matrices

    m = substitution_matrices.load("BLOSUM62")
    return np.array([[m[a][b] for b in STANDARD_AA] for a in STANDARD_AA], dtype=np.float64)


def aa_indices(sequence: str) -> np.ndarray:
    """(L,) int64: 0..19 for the standard amino acids, -1 for anything else."""
    return _AA_INDEX[np.frombuffer(sequence.upper().encode("ascii"), dtype=np.uint8)]


def aa_attention_counts(
    maps_iter: Iterable[MapsRecord],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_sequences: int | None = 800,
    exclude_self: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(O, E, n_sequences)`` with O and E (layers, heads, 20, 20), the observed and expected
    attention mass of the module docstring, over the first ``max_sequences`` records."""
    obs = exp = None
    n = 0
    for rec in maps_iter:
        if max_sequences is not None and n >= max_sequences:
            break
        if rec.attentions is None:
            raise ValueError(f"record {rec.id}: no attention maps stored")
        a = np.asarray(rec.attentions, dtype=np.float32)  # (layers, heads, L, L)
        if layers is not None:
            a = a[list(layers)]
        if heads is not None:
            a = a[:, list(heads)]
        idx = aa_indices(rec.sequence)
        keep = idx >= 0
        if keep.sum() < 2:
            log.warning("record %s: fewer than 2 standard residues, skipped", rec.id)
            continue
        idx = idx[keep]
        a = a[..., keep, :][..., :, keep]
        L = len(idx)
        if exclude_self:
            a = a.copy()
            a[..., np.arange(L), np.arange(L)] = 0.0
        onehot = np.zeros((L, 20), dtype=np.float32)  # (L, 20)
        onehot[np.arange(L), idx] = 1.0
        o = np.einsum("ia,lhij,jb->lhab", onehot, a, onehot, optimize=True)
        rows = a.sum(-1)  # r_i: (layers, heads, L)
        counts = onehot.sum(0)  # n_b: (20,)
        comp = (counts[None, :] - onehot) / (L - 1) if exclude_self else np.broadcast_to(counts / L, (L, 20))
        e = np.einsum("lhi,ia,ib->lhab", rows, onehot, comp, optimize=True)
        obs = o.astype(np.float64) if obs is None else obs + o
        exp = e.astype(np.float64) if exp is None else exp + e
        n += 1
    if obs is None:
        raise ValueError("no usable sequences in the maps")
    return obs, exp, n


def normalize(obs: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """``log2((O + O^T) / (E + E^T))`` over the last two axes; NaN where nothing was expected."""
    o = obs + np.swapaxes(obs, -1, -2)
    e = exp + np.swapaxes(exp, -1, -2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((e > 0) & (o > 0), np.log2(o / np.where(e > 0, e, 1.0)), np.nan)


def aa_attention_matrix(
    maps_iter: Iterable[MapsRecord],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_sequences: int | None = 800,
    exclude_self: bool = True,
    per_head: bool = False,
) -> np.ndarray:
    """The (20, 20) similarity S (module docstring) over all the selected layers and heads
    together, or (layers, heads, 20, 20) with ``per_head``. Order: ``STANDARD_AA``."""
    obs, exp, _ = aa_attention_counts(maps_iter, layers, heads, max_sequences, exclude_self)
    if per_head:
        return normalize(obs, exp)
    return normalize(obs.sum((0, 1)), exp.sum((0, 1)))


def blosum_correlation(M: np.ndarray, include_diagonal: bool = False) -> dict:
    """Pearson and Spearman correlation of a (20, 20) matrix with BLOSUM62 over the upper
    triangle (190 pairs of distinct amino acids; 210 with ``include_diagonal``). NaN entries are
    left out; a matrix constant within 1e-5 (float32 round-off of log2 ratios) gives NaN."""
    from scipy import stats

    M = np.asarray(M, dtype=np.float64)
    iu = np.triu_indices(20, k=0 if include_diagonal else 1)
    x, y = M[iu], blosum62()[iu]
    ok = np.isfinite(x)
    x, y = x[ok], y[ok]
    out = {
        "n_pairs": int(ok.sum()),
        "pearson": float("nan"),
        "spearman": float("nan"),
        "pearson_p": float("nan"),
        "spearman_p": float("nan"),
    }
    if len(x) < 3 or np.ptp(x) < 1e-5:  # constant up to float32 round-off: no correlation
        return out
    r, p = stats.pearsonr(x, y)
    rho, q = stats.spearmanr(x, y)
    out.update(pearson=float(r), pearson_p=float(p), spearman=float(rho), spearman_p=float(q))
    return out


def plot_aa_similarity(M: np.ndarray, path: str | Path, title: str = "attention similarity") -> None:
    """Heatmap of M next to BLOSUM62 (same amino-acid order), with the correlation in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = blosum_correlation(M)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    lim = np.nanmax(np.abs(M)) if np.isfinite(M).any() else 1.0
    lim = lim if lim > 0 else 1.0
    for ax, mat, name, kw in (
        (axes[0], M, f"{title}\nlog2 observed / expected", dict(cmap="RdBu_r", vmin=-lim, vmax=lim)),
        (axes[1], blosum62(), "BLOSUM62", dict(cmap="RdBu_r", vmin=-11, vmax=11)),
    ):
        im = ax.imshow(mat, **kw)
        ax.set_xticks(range(20), list(STANDARD_AA), fontsize=7)
        ax.set_yticks(range(20), list(STANDARD_AA), fontsize=7)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(
        f"Pearson r = {corr['pearson']:.3f}, Spearman rho = {corr['spearman']:.3f} "
        f"({corr['n_pairs']} pairs of distinct amino acids)",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        outputs.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def run_aa_similarity(
    maps: str | Path,
    output_dir: str | Path,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_sequences: int | None = 800,
    exclude_self: bool = True,
    resume: bool = False,
) -> dict:
    """Aggregate a maps file, correlate with BLOSUM62 (all heads together and each head alone),
    write ``aa_similarity.json``, ``aa_similarity.csv`` (the 20 x 20 matrix) and
    ``aa_similarity.png``; returns the JSON content. A rerun replaces them only when all three are
    written; ``resume``: a finished run of the same maps and options is returned without work
    (see :mod:`~protein_performer.analysis.rerun`)."""
    from protein_performer.analysis.maps import MapsFile

    out = Path(output_dir)
    check_output_dir(out)
    options = {"layers": layers, "heads": heads, "max_sequences": max_sequences, "exclude_self": exclude_self}
    inputs = {"maps": input_stamp(maps), "options": jsonable(options)}
    if resume and (done := finished_report(out / REPORT_FILE, inputs, "aa_similarity")) is not None:
        return done
    with MapsFile(maps) as mf:
        try:
            obs, exp, n = aa_attention_counts(
                mf.iter(load=("attentions",), layers=layers), None, heads, max_sequences, exclude_self
            )
        except UserError:
            raise
        except (ValueError, IndexError) as e:  # no maps stored, no usable record, a layer / head out of range
            raise UserError(
                f"{maps}: {e}; export the maps with include=[attentions,...] and pick layers / heads the model has"
            ) from e
    M = normalize(obs.sum((0, 1)), exp.sum((0, 1)))
    per_head = normalize(obs, exp)
    layer_ids = list(layers) if layers is not None else list(range(obs.shape[0]))
    head_ids = list(heads) if heads is not None else list(range(obs.shape[1]))
    heads_corr = []
    for li, layer in enumerate(layer_ids):
        for hi, h in enumerate(head_ids):
            c = blosum_correlation(per_head[li, hi])
            heads_corr.append({"layer": layer, "head": h, "pearson": c["pearson"], "spearman": c["spearman"]})
    finite = [c for c in heads_corr if np.isfinite(c["pearson"])]
    best = max(finite, key=lambda c: c["pearson"]) if finite else None
    result = {
        "maps": str(maps),
        "n_sequences": n,
        "layers": layer_ids,
        "heads": head_ids,
        "exclude_self": exclude_self,
        "all_heads": blosum_correlation(M),
        "best_head": best,
        "per_head": heads_corr,
        "amino_acids": STANDARD_AA,
        "matrix": [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in M],
        "inputs": inputs,
    }
    # the CSV and the plot, then the JSON last, into a staging folder swapped in when complete
    with staged_output(out, OUTPUTS) as stage:
        outputs.write_text(
            stage / "aa_similarity.csv",
            "aa,"
            + ",".join(STANDARD_AA)
            + "\n"
            + "".join(a + "," + ",".join(f"{v:.5f}" for v in row) + "\n" for a, row in zip(STANDARD_AA, M)),
        )
        plot_aa_similarity(M, stage / "aa_similarity.png", title=f"attention, {n} sequences, all heads")
        outputs.write_json(stage / REPORT_FILE, _finite(result), indent=1)
    log.info("aa similarity over %d sequences: pearson %.3f", n, result["all_heads"]["pearson"])
    return result


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
