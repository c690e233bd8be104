"""Contacts of a factored-attention model read as a Potts model's couplings (issue 21, an idea measured
on the family-contacts recipe's runs; not yet the recipe's output).

The recipe scores the mean over heads of the APC'd attention maps. Bhattacharya et al. (2020, "Single
layers of attention suffice to predict protein contacts") read a factored-attention layer the way plmDCA
reads a Potts model: the energy it gives residue a at position i next to residue b at position j is

    J_ij(a, b) = sum_h A_h(i, j) M_h(a, b),   M_h = U W_O^h W_V^h E

(A_h: head h's position-only attention map; E: the token embeddings, W_V^h / W_O^h: the head's value and
output projections, U: the output embeddings), and score a pair by the Frobenius norm of J_ij over the 20
amino acids, symmetrized, then APC. Here the model has layer norms and a feed-forward block around the
attention: E is scaled by ln1's weight and U by the final norm's, the rest of the path is left out (a
linear reading of a nonlinear model). With G_hk = <M_h, M_k> (heads x heads),
||J_ij||_F = sqrt(a_ij^T G a_ij) for a_ij = (A_h(i, j))_h, so no (L, L, 20, 20) array is made.

    python benchmarks/couplings.py <recipe output_dir> [...]   # long P@L of both readings per run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protein_performer.analysis.maps.ops import apc  # noqa: E402
from protein_performer.data.tokenizer import STANDARD_AA, Tokenizer  # noqa: E402


def head_matrices(state: dict[str, torch.Tensor], prefix: str = "model.") -> np.ndarray:
    """(heads, 20, 20) float64: M_h = U W_O^h W_V^h E over the 20 amino acids (rows: the predicted
    residue a at i, columns: the residue b at j) of a one-layer factored model's state dict."""
    g = {k[len(prefix) :]: v.detach().double() for k, v in state.items() if k.startswith(prefix)}
    heads, _, dim_head = g["blocks.0.attn.q_pos"].shape
    aa = torch.as_tensor([int(Tokenizer().encode(a)[0]) for a in STANDARD_AA])
    emb = (g["token_emb.weight"][aa] * g["blocks.0.ln1.weight"]).T  # (dim, 20)
    out = g["lm_head.weight"][aa] * g["norm.weight"]  # (20, dim)
    wv, wo = g["blocks.0.attn.to_v.weight"], g["blocks.0.attn.to_out.weight"]
    m = [
        out @ wo[:, h * dim_head : (h + 1) * dim_head] @ wv[h * dim_head : (h + 1) * dim_head] @ emb
        for h in range(heads)
    ]
    return torch.stack(m).numpy()


def coupling_map(attentions: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """(L, L) APC'd Frobenius norms of J_ij = sum_h A_h(i, j) M_h, symmetrized (F + F^T), from
    ``attentions`` (heads, L, L) and ``matrices`` (heads, q, q)."""
    a = np.asarray(attentions, dtype=np.float64)
    heads, length, _ = a.shape
    m = np.asarray(matrices, dtype=np.float64).reshape(heads, -1)
    gram = m @ m.T
    flat = a.reshape(heads, -1)
    norms = np.sqrt(np.maximum(np.einsum("hn,hk,kn->n", flat, gram, flat), 0.0)).reshape(length, length)
    sym = norms + norms.T
    np.fill_diagonal(sym, 0.0)
    return apc(sym)


def run_scores(run_dir: str | Path) -> dict:
    """Long-range P@L of a finished recipe run (``output_dir`` with checkpoints/last.ckpt and maps.h5
    of its chain): the recipe's mean APC map and the coupling reading of the same model."""
    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.structures import load_structures
    from protein_performer.recipes.family_contacts.scoring import score_map

    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    with h5py.File(run / "maps.h5") as f:
        attentions = f[next(iter(f))]["attentions"][0].astype(np.float64)  # layer 0: (heads, L, L)
    chains, _ = load_structures(summary["structure"])
    protein = load_proteins(run / "maps.h5", chains)[0][0]
    if attentions.shape[-1] != protein.L:
        raise ValueError(f"{run}: maps of {attentions.shape[-1]} positions, chain of {protein.L}")
    cmap = coupling_map(attentions, head_matrices(state))
    mean = protein.features["trained"].astype(np.float64).mean(1)
    return {
        "couplings": score_map(protein.pred_matrix(cmap[protein.i, protein.j]), protein.true),
        "mean_apc": score_map(protein.pred_matrix(mean), protein.true),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="family-contacts recipe output folders")
    parser.add_argument(
        "--record", action="store_true", help="add the scores to those runs' rows of results/family_contacts.json"
    )
    args = parser.parse_args(argv)
    found = {}
    for run in args.runs:
        s = run_scores(run)
        found[str(Path(run).resolve())] = {
            "long_P@L": s["couplings"]["long"]["P@L"],
            "long_P@L/5": s["couplings"]["long"]["P@L/5"],
        }
        print(
            f"{run}: long P@L couplings {s['couplings']['long']['P@L']:.3f} "
            f"(P@L/5 {s['couplings']['long']['P@L/5']:.3f}), mean APC {s['mean_apc']['long']['P@L']:.3f}"
        )
    if args.record:
        import family_contacts

        res = family_contacts.load_results()
        rows = [r for r in res["runs"] if str(Path(r["output_dir"]).resolve()) in found]
        for r in rows:
            r["couplings"] = found[str(Path(r["output_dir"]).resolve())]
        family_contacts.save_results(res)
        print(f"recorded in {len(rows)} rows of {family_contacts.JSON}")


if __name__ == "__main__":
    main()
