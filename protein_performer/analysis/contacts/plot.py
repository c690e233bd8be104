"""The PNG of one contact prediction: probabilities (upper triangle, when the map was kept) and the
top-L pairs (lower triangle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protein_performer.outputs import save_figure


def plot_prediction(pred, path: str | Path, min_sep: int = 6) -> None:
    """PNG of a ``ContactPrediction``: the contact probabilities (upper triangle; none for a
    prediction of top pairs only) and the top-L pairs (lower triangle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(pred.sequence)
    fig, ax = plt.subplots(figsize=(5, 5))
    if pred.contacts is not None:  # top pairs only: no map to show
        upper = np.triu(pred.contacts, k=1)
        ax.imshow(np.where(upper > 0, upper, np.nan), cmap="Blues", vmin=0, vmax=1, origin="upper")
    else:
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(L - 0.5, -0.5)
    pairs = pred.top_pairs(L, min_sep)
    if pairs:
        ii = [j - 1 - pred.start for _, j, _ in pairs]
        jj = [i - 1 - pred.start for i, _, _ in pairs]
        ax.scatter(jj, ii, s=6, c="tab:red", label=f"top-L pairs (|i-j| >= {min_sep})")
        ax.legend(loc="lower left", fontsize=7)
    ax.set_title(f"{pred.id} (L = {L})", fontsize=9)
    ax.set_xlabel("residue")
    ax.set_ylabel("residue")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
