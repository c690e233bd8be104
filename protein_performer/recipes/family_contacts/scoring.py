"""Unsupervised scores of the family-contacts recipe: the mean-of-heads APC map of the family's
chain (``mean over layers and heads of APC(A + A^T)``, no fitted weights) and each layer's mean, by
range and P@L; the in-training :class:`ContactProbe`; the homolog-averaged map (the chain's map and
those of family members carried onto it through pairwise alignments, averaged); the contacts plot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protein_performer.analysis.alignment import aligned_positions
from protein_performer.errors import UserError
from protein_performer.recipes.family_contacts.extract import read_family_fasta

LONG_RANGE = 24  # |i - j| >= 24: the long range of the contact density
PLOT_MIN_SEP = 12  # the plot shows medium and long-range predictions


def mean_apc_maps(apc: np.ndarray) -> dict[str, np.ndarray]:
    """From (layers, heads, L, L) APC maps: ``{"mean": mean over all maps, "layer0": ..., ...}``."""
    apc = np.asarray(apc, dtype=np.float64)
    out = {"mean": apc.mean((0, 1))}
    for layer in range(apc.shape[0]):
        out[f"layer{layer}"] = apc[layer].mean(0)
    return out


def score_map(pred: np.ndarray, true: np.ndarray) -> dict:
    """precision_table of one (L, L) map against a contact map, plus the long-range contact
    density (the precision of a random ranking)."""
    from protein_performer.analysis.contacts import precision_table

    table = precision_table(pred, true)
    i, j = np.triu_indices(true.shape[0], k=LONG_RANGE)
    labels = true[i, j]
    table["long_density"] = float(np.nanmean(labels)) if np.isfinite(labels).any() else float("nan")
    return table


def score_maps(maps: str | Path, structure: str | Path, baseline_maps: str | Path | None = None) -> dict:
    """Unsupervised scores of a maps file (and a random-init baseline) on one structure's chain."""
    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.structures import load_structures

    chains, failures = load_structures(structure)
    if not chains:
        raise UserError(f"{structure}: no chain read ({failures[0].reason if failures else 'empty'})")
    proteins, fails = load_proteins(maps, chains, baseline_maps=baseline_maps)
    if not proteins:
        raise UserError(
            f"{maps}: no record matches {structure} "
            f"({fails[0].reason if fails else 'no records'}); export that structure first"
        )
    protein = proteins[0]
    out: dict = {"protein": protein.name, "L": protein.L}
    for key, feats in protein.features.items():
        layers, heads = protein.n_heads[key]
        by_map = feats.astype(np.float64).reshape(len(feats), layers, heads)
        scores = {"mean": score_map(protein.pred_matrix(by_map.mean((1, 2))), protein.true)}
        for layer in range(layers):
            scores[f"layer{layer}"] = score_map(protein.pred_matrix(by_map[:, layer].mean(1)), protein.true)
        out[key] = scores
    return out


def plot_contacts(maps: str | Path, structure: str | Path, path: str | Path, title: str = "") -> None:
    """Top-L long+medium predictions of the mean APC map (upper triangle) over the true contacts."""
    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.structures import load_structures
    from protein_performer.studies.reports import pyplot, save_figure

    chains, _ = load_structures(structure)
    protein = load_proteins(maps, chains)[0][0]
    pred = protein.pred_matrix(protein.features["trained"].astype(np.float64).mean(1))
    L = protein.L
    i, j = np.triu_indices(L, k=PLOT_MIN_SEP)
    order = np.argsort(-pred[i, j])[:L]
    top_i, top_j = i[order], j[order]
    hit = protein.true[top_i, top_j] == 1
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    contact_i, contact_j = np.nonzero(np.triu(np.nan_to_num(protein.true), k=6))
    ax.scatter(contact_j, contact_i, s=6, c="0.75", marker="s", label="true contact (8 A)")
    ax.scatter(contact_i, contact_j, s=6, c="0.75", marker="s")
    ax.scatter(top_j[hit], top_i[hit], s=10, c="tab:blue", label="top-L predicted, correct")
    ax.scatter(top_j[~hit], top_i[~hit], s=10, c="tab:red", marker="x", label="top-L predicted, wrong")
    ax.set_xlim(-1, L)
    ax.set_ylim(L, -1)
    ax.set_aspect("equal")
    ax.set_title(title or f"{protein.name}: mean-of-heads APC map, |i-j| >= 12", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    save_figure(fig, Path(path))


# ------------------------------------------------------------------------------ in-memory maps
def chain_residues(structure: str | Path) -> tuple[str, np.ndarray]:
    """Sequence and residue ids of the (single) chain of ``structure``."""
    from protein_performer.analysis.structures import load_structures
    from protein_performer.data.tokenizer import Tokenizer

    chains, _ = load_structures(structure)
    seq = chains[0].sequence
    return seq, Tokenizer().encode(seq)


def _mean_apc_of(model, residues: np.ndarray) -> np.ndarray:
    """(layers, heads, L, L) APC maps of one tokenized sequence, the export's own maps path."""
    from protein_performer.analysis.export import run_sequence
    from protein_performer.analysis.maps import apc_maps

    maps: list[np.ndarray] = []
    run_sequence(model, residues, on_layer=lambda i, m: maps.append(m.float().cpu().numpy()))
    return apc_maps(np.stack(maps))


class _Probe:
    """Scores the mean APC map of one chain from an in-memory model (the export's own maps path)."""

    def __init__(self, structure: str | Path):
        from protein_performer.analysis.contacts import contact_map
        from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence, load_structures

        chains, _ = load_structures(structure)
        chain = chains[0]
        self.residues = chain_residues(structure)[1]
        self.true = contact_map(coords_on_sequence(chain, align_to_sequence(chain, chain.sequence)))

    def __call__(self, model) -> dict:
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                apc = _mean_apc_of(model, self.residues)
        finally:
            model.train(was_training)
        return {k: score_map(v, self.true) for k, v in mean_apc_maps(apc).items()}


try:
    import pytorch_lightning as pl

    class ContactProbe(pl.Callback):
        """Every ``every_s`` seconds of training (and at the end), the mean-of-heads APC long P@L
        of ``structure``'s chain; appended as JSON lines to ``output``."""

        def __init__(self, structure: str, output: str, every_s: float = 60.0):
            self.structure, self.output, self.every_s = structure, Path(output), float(every_s)
            self._probe: _Probe | None = None
            self._t0 = self._next = 0.0
            self._train_s = 0.0

        def on_train_start(self, trainer, pl_module):
            self._probe = _Probe(self.structure)
            self._t0 = time.time()
            self._next = self.every_s
            self._write(trainer, pl_module, 0.0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed = time.time() - self._t0  # training seconds (probe time excluded)
            if elapsed >= self._next:
                self._next += self.every_s
                t = time.time()
                self._write(trainer, pl_module, elapsed)
                self._t0 += time.time() - t

        def on_train_end(self, trainer, pl_module):
            self._write(trainer, pl_module, time.time() - self._t0)

        def _write(self, trainer, pl_module, elapsed: float) -> None:
            s = self._probe(pl_module.model)
            row = {
                "minutes": round(elapsed / 60, 3),
                "step": int(trainer.global_step),
                "long_P@L": s["mean"]["long"]["P@L"],
                "long_P@L/5": s["mean"]["long"]["P@L/5"],
                "layers_long_P@L": [s[k]["long"]["P@L"] for k in s if k.startswith("layer")],
            }
            with open(self.output, "a") as fh:
                fh.write(json.dumps(row) + "\n")
except ImportError:  # pragma: no cover - lightning is a dependency
    pass


# ------------------------------------------------------------------------------ homolog-averaged map
def homolog_averaged_map(model, target: str, homologs: Sequence[str]) -> np.ndarray:
    """Unsupervised map of ``target`` from its family: the mean-of-heads APC map of ``target`` and
    of every homolog, each carried onto ``target``'s positions through a pairwise alignment, then
    averaged where defined (like an MSA's column pairs; no fitted weights). (L, L) float64."""
    from protein_performer.data.tokenizer import Tokenizer

    tok = Tokenizer()
    L = len(target)
    total, count = np.zeros((L, L)), np.zeros((L, L))
    model.eval()
    for seq in [target, *homologs]:
        mean = _mean_apc_of(model, tok.encode(seq)).astype(np.float64).mean((0, 1))
        src, dst = aligned_positions(seq, target)  # the identity for the target itself
        total[np.ix_(dst, dst)] += mean[np.ix_(src, src)]
        count[np.ix_(dst, dst)] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def score_homolog_averaged(ckpt: str | Path, structure: str | Path, fasta: str | Path, n: int, seed: int = 0) -> dict:
    """Scores of :func:`homolog_averaged_map` with ``n`` family members drawn (seeded) from
    ``fasta``, for the checkpoint and its random-init twin."""
    import torch

    from protein_performer.pretrained import load_model

    records = read_family_fasta(fasta)
    pick = np.random.default_rng(seed).choice(len(records), min(n, len(records)), replace=False)
    homologs = [records[i] for i in sorted(pick)]
    probe = _Probe(structure)
    target, _ = chain_residues(structure)
    out = {"n_homologs": len(homologs)}
    with torch.no_grad():
        for key, lm in (("trained", load_model(ckpt)), ("random_init", load_model("random", model_config=str(ckpt)))):
            out[key] = score_map(homolog_averaged_map(lm.model, target, homologs), probe.true)
    return out
