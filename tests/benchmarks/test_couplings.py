"""The coupling reading of a factored-attention model (benchmarks/couplings.py): the Frobenius norms
from the heads' Gram matrix equal those of the explicit J_ij = sum_h A_h(i, j) M_h, symmetrized and
APC'd; M_h of a real one-layer factored model is linear in each projection and vanishes with its head."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch

from protein_performer.model.performer import PerformerConfig, PerformerLM

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
couplings = importlib.import_module("couplings")


def test_coupling_map_equals_the_explicit_frobenius_norms():
    rng = np.random.default_rng(0)
    heads, length, q = 3, 9, 5
    a = rng.random((heads, length, length))
    m = rng.normal(size=(heads, q, q))
    norms = np.zeros((length, length))
    for i in range(length):
        for j in range(length):
            norms[i, j] = np.linalg.norm(sum(a[h, i, j] * m[h] for h in range(heads)))
    sym = norms + norms.T
    np.fill_diagonal(sym, 0.0)
    want = sym - sym.sum(1)[:, None] * sym.sum(0)[None, :] / sym.sum()
    got = couplings.coupling_map(a, m)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got, got.T, rtol=0, atol=1e-12)


def _factored(seed: int = 0) -> PerformerLM:
    torch.manual_seed(seed)
    cfg = PerformerConfig(
        max_len=40, dim=16, depth=1, heads=3, dim_head=4, ff_dim=32, dropout=0.0, attention="favor_relu",
        nb_features=8, qk="position",
    )  # fmt: skip
    return PerformerLM(cfg)


def test_head_matrices_of_a_factored_model():
    model = _factored()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    m = couplings.head_matrices(state)
    assert m.shape == (3, 20, 20) and np.abs(m).min() >= 0 and np.abs(m).max() > 0
    state2 = dict(state)
    state2["model.blocks.0.attn.to_out.weight"] = 2 * state["model.blocks.0.attn.to_out.weight"]
    np.testing.assert_allclose(couplings.head_matrices(state2), 2 * m, rtol=1e-12, atol=1e-15)
    wv = state["model.blocks.0.attn.to_v.weight"].clone()
    wv[4:8] = 0  # head 1's values
    state2["model.blocks.0.attn.to_v.weight"] = wv
    got = couplings.head_matrices(state2)
    assert np.all(got[1] == 0) and np.abs(got[0]).max() > 0 and np.abs(got[2]).max() > 0
