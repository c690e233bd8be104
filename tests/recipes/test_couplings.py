"""The coupling reading of a one-layer factored-attention model (recipes/family_contacts/couplings.py):
the Frobenius norms from the heads' Gram matrix equal those of the explicit J_ij = sum_h A_h(i, j) M_h,
symmetrized and APC'd; M_h is linear in each projection and vanishes with its head's values; models
with more layers or content attention are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.recipes.family_contacts.couplings import coupling_map, head_matrices, reads_as_couplings


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
    got = coupling_map(a, m)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got, got.T, rtol=0, atol=1e-12)


def _factored(depth: int = 1, qk: str = "position") -> PerformerLM:
    torch.manual_seed(0)
    cfg = PerformerConfig(
        max_len=40, dim=16, depth=depth, heads=3, dim_head=4, ff_dim=32, dropout=0.0, attention="favor_relu",
        nb_features=8, qk=qk,
    )  # fmt: skip
    return PerformerLM(cfg)


def test_head_matrices_are_linear_in_the_projections_and_vanish_with_a_head():
    model = _factored()
    m = head_matrices(model)
    assert m.shape == (3, 20, 20) and np.abs(m).max() > 0
    with torch.no_grad():
        model.blocks[0].attn.to_out.weight.mul_(2.0)
    np.testing.assert_allclose(head_matrices(model), 2 * m, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        model.blocks[0].attn.to_v.weight[4:8] = 0.0  # head 1's values
    got = head_matrices(model)
    assert np.all(got[1] == 0) and np.abs(got[0]).max() > 0 and np.abs(got[2]).max() > 0


def test_only_one_layer_of_factored_attention_reads_as_couplings():
    assert reads_as_couplings(_factored())
    for model in (_factored(depth=2), _factored(qk="content")):
        assert not reads_as_couplings(model)
        with pytest.raises(ValueError, match="factored"):
            head_matrices(model)
