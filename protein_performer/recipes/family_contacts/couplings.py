"""A one-layer factored-attention model read as a Potts model's couplings: a second contact map of the
recipe, beside the mean over heads of the APC'd attention maps.

Bhattacharya et al. (2020, "Single layers of attention suffice to predict protein contacts") read a
factored-attention layer the way plmDCA reads a Potts model: the energy the layer gives residue a at
position i next to residue b at position j is

    J_ij(a, b) = sum_h A_h(i, j) M_h(a, b),   M_h = U W_O^h W_V^h E

(A_h: head h's position-only attention map; E: the token embeddings, W_V^h / W_O^h: the head's value
and output projections, U: the output embeddings), and a pair is scored by the Frobenius norm of J_ij
over the 20 amino acids, symmetrized (F + F^T), then APC. The recipe's model has layer norms and a
feed-forward block around the attention: E is scaled by ln1's weight and U by the final norm's, the
rest of the path is left out (a linear reading of a nonlinear model). With the heads' Gram matrix
G_hk = <M_h, M_k>, ||J_ij||_F = sqrt(a_ij^T G a_ij) for a_ij = (A_h(i, j))_h, so no (L, L, 20, 20)
array is made.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from protein_performer.analysis.maps.ops import apc
from protein_performer.data.tokenizer import STANDARD_AA, Tokenizer
from protein_performer.model.attention_potts import coupling_norms
from protein_performer.model.performer import PerformerLM


def reads_as_couplings(model: PerformerLM) -> bool:
    """True for the models the reading is defined for: one layer of factored (position-only) attention."""
    return model.config.qk == "position" and model.config.depth == 1


def head_matrices(model: PerformerLM) -> np.ndarray:
    """(heads, 20, 20) float64: M_h = U W_O^h W_V^h E over the 20 amino acids (rows: the residue a
    predicted at i, columns: the residue b at j)."""
    if not reads_as_couplings(model):
        raise ValueError("couplings are read from one layer of factored attention (qk=position, depth 1)")
    block, dh = model.blocks[0], model.config.dim_head
    aa = torch.as_tensor([int(Tokenizer().encode(a)[0]) for a in STANDARD_AA])
    with torch.no_grad():
        emb = (model.token_emb.weight[aa] * block.ln1.weight).double().T  # (dim, 20)
        out = (model.lm_head.weight[aa] * model.norm.weight).double()  # (20, dim)
        wv, wo = block.attn.to_v.weight.double(), block.attn.to_out.weight.double()
        m = [out @ wo[:, h * dh : (h + 1) * dh] @ wv[h * dh : (h + 1) * dh] @ emb for h in range(model.config.heads)]
    return torch.stack(m).numpy()


def coupling_map(attentions: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """(L, L) float64: APC of the symmetrized Frobenius norms of J_ij = sum_h A_h(i, j) M_h, from
    ``attentions`` (heads, L, L) and ``matrices`` (heads, q, q)."""
    return apc(coupling_norms(attentions, matrices))


def score_couplings(model: PerformerLM, maps: str | Path, structure: str | Path) -> dict:
    """The coupling map of the first record of ``maps`` (its stored layer-0 ``attentions``, exported
    from ``model``) scored against ``structure`` as the recipe scores its mean APC map."""
    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.structures import load_structures
    from protein_performer.recipes.family_contacts.scoring import score_map

    with h5py.File(maps, "r") as f:
        attentions = f[next(iter(f))]["attentions"][0]
    chains, _ = load_structures(structure)
    protein = load_proteins(maps, chains)[0][0]
    if attentions.shape[-1] != protein.L:
        raise ValueError(f"{maps}: maps of {attentions.shape[-1]} positions, chain of {protein.L}")
    cmap = coupling_map(attentions, head_matrices(model))
    return score_map(protein.pred_matrix(cmap[protein.i, protein.j]), protein.true)
