"""Contact study, the output: ``report.json`` and ``report.csv`` (each written atomically), the
plain-text table the entry point prints, and the plots (precision by range; true vs predicted
contact maps).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from protein_performer import outputs
from protein_performer.analysis.contacts.metrics import MIN_SEP, RANGES, precision_at_k
from protein_performer.analysis.contacts.proteins import Protein

log = logging.getLogger(__name__)

TABLE_KS = ("P@L", "P@L/5")  # the precisions the table and the bar chart show


def write_report(report: dict, output_dir: str | Path) -> None:
    """``report.csv`` then ``report.json`` (each written atomically)."""
    write_report_csv(report, output_dir)
    write_report_json(report, output_dir)


def write_report_json(report: dict, output_dir: str | Path) -> None:
    """``report.json``, written under a temporary name and renamed when complete."""
    outputs.write_json(Path(output_dir) / "report.json", _jsonable(report), indent=1)
    log.info("wrote %s", Path(output_dir) / "report.json")


def write_report_csv(report: dict, output_dir: str | Path) -> None:
    """``report.csv`` (method, protein, L, range, k, precision; MEAN rows), atomically."""
    out = Path(output_dir)
    lengths = {p["name"]: p["L"] for p in report["proteins"]}
    with outputs.atomic_output(out / "report.csv") as tmp, open(tmp, "w", newline="") as fh:
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
    cols = [(r, k) for r in RANGES for k in TABLE_KS]
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
    for ax, k in zip(axes, TABLE_KS):
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
        outputs.save_figure(fig, path, dpi=110)
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
        outputs.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
