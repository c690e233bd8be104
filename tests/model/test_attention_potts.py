"""The attention-Potts model (model/attention_potts.py), the family-contacts tool's
default: its maps are Performer (or exact) attention over the columns without the diagonal, its
logits equal the Potts conditionals written out one sequence, position and state at a time, no
logit at i depends on the residue at i, its L2 term is the sum of the squared couplings, its
coupling norms are the Frobenius norms of those couplings, and a fit on a Gibbs sample of a Potts
model with two strong couplings ranks those two pairs first."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protein_performer.analysis.maps.ops import apc
from protein_performer.model import attention_potts as ap
from protein_performer.recipes.family_contacts.msa import sequence_weights

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # tests/benchmarks/test_potts.py imports the benchmark's modules


def tiny(attention: str = "favor_relu", length: int = 7, heads: int = 3, seed: int = 0) -> ap.AttentionPotts:
    model = ap.AttentionPotts(ap.AttentionPottsConfig(length, heads, 4, attention, 8, seed)).double()
    with torch.no_grad():  # values and fields away from their small initial scale
        model.values.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        model.fields.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return model


@pytest.mark.parametrize("attention", ap.ATTENTIONS)
def test_maps_are_attention_rows_without_the_diagonal(attention):
    model = tiny(attention)
    a = model.attention().detach()
    assert a.shape == (3, 7, 7) and (a >= 0).all() and not a.diagonal(dim1=1, dim2=2).any()
    np.testing.assert_allclose(a.sum(-1).numpy(), 1.0, atol=1e-12)
    if attention == "exact":  # softmax of q.k / sqrt(d) over j != i
        s = torch.einsum("hid,hjd->hij", model.q_pos, model.k_pos).detach() / 2.0
        e = torch.exp(s) * (1 - torch.eye(7, dtype=s.dtype))
        np.testing.assert_allclose(a.numpy(), (e / e.sum(-1, keepdim=True)).numpy(), atol=1e-12)
    else:  # phi(q_i).phi(k_j) / sum_{j' != i}, phi the FAVOR+ features of the model's FeatureMap
        fq = model.features.features(model.q_pos[None].detach(), is_query=True)[0]
        fk = model.features.features(model.k_pos[None].detach(), is_query=False)[0]
        k = torch.einsum("him,hjm->hij", fq, fk) * (1 - torch.eye(7, dtype=fq.dtype))
        np.testing.assert_allclose(a.numpy(), (k / k.sum(-1, keepdim=True)).numpy(), atol=1e-12)


@pytest.mark.parametrize("attention", ["favor_relu", "exact"])
def test_logits_are_the_potts_conditionals_and_ignore_their_own_residue(attention):
    model = tiny(attention)
    rng = np.random.default_rng(0)
    states = torch.as_tensor(rng.integers(0, ap.Q, size=(4, 7)))
    with torch.no_grad():
        logits, a, w, h = model(states), model.attention(), model.values.detach(), model.fields.detach()
    for n in range(4):
        for i in range(7):
            for c in range(ap.Q):
                expected = h[i, c] + sum(
                    a[k, i, j] * w[k, c, states[n, j]] for k in range(3) for j in range(7) if j != i
                )
                assert float(logits[n, i, c]) == pytest.approx(float(expected), abs=1e-12)
    changed = states.clone()
    changed[:, 2] = (changed[:, 2] + 5) % ap.Q
    with torch.no_grad():
        again = model(changed)
    torch.testing.assert_close(again[:, 2], logits[:, 2], rtol=0, atol=1e-12)  # i's own residue is not seen
    assert not torch.allclose(again[:, 0], logits[:, 0])  # the others' are


def test_loss_is_weighted_pseudo_likelihood_plus_the_potts_l2():
    model = tiny("favor_relu")
    rng = np.random.default_rng(1)
    states = torch.as_tensor(rng.integers(0, ap.Q, size=(5, 7)))
    weights = torch.as_tensor(rng.uniform(0.2, 1.0, size=5))
    with torch.no_grad():
        logp = torch.log_softmax(model(states), -1)
        nll = -sum(float(weights[n]) * float(logp[n, i, states[n, i]]) for n in range(5) for i in range(7))
        j = model.couplings().numpy()  # (i, a, j, b)
        pairs = sum((j[i, :, k, :] ** 2).sum() for i in range(7) for k in range(7) if i < k)
        pairs_other_way = sum((j[k, :, i, :] ** 2).sum() for i in range(7) for k in range(7) if i < k)
        penalty = ap.pair_penalty(7) * 0.5 * (pairs + pairs_other_way) + ap.LAMBDA_H * float((model.fields**2).sum())
        assert float(model.neg_log_pl(states, weights)) == pytest.approx(nll, rel=1e-12)
        assert float(model.penalty()) == pytest.approx(penalty, rel=1e-10)
        n_eff = 3.0
        loss = float(model.loss(states, weights, n_eff))
        assert loss == pytest.approx(nll / float(weights.sum()) + penalty / n_eff, rel=1e-12)
        assert not j[np.arange(7), :, np.arange(7), :].any()  # J_ii = 0


def test_coupling_norms_are_symmetrized_frobenius_norms_of_the_couplings():
    model = tiny("favor_softmax")
    with torch.no_grad():
        j = model.couplings().numpy()[:, :20, :, :20]
    norms = np.sqrt((j**2).sum((1, 3)))
    sym = norms + norms.T
    np.fill_diagonal(sym, 0.0)
    np.testing.assert_allclose(model.coupling_norms(), sym, atol=1e-10)


def test_fit_ranks_the_two_strong_couplings_first():
    gibbs_sample = _gibbs()
    rng = np.random.default_rng(3)
    length = 10
    h = rng.normal(0, 0.5, size=(length, ap.Q))
    j = np.zeros((length, length, ap.Q, ap.Q))
    strong = [(1, 6), (3, 9)]
    for a, b in strong:  # the same amino acid at both ends is favoured
        j[a, b, :20, :20] = j[b, a, :20, :20] = 2.5 * np.eye(20)
    states = gibbs_sample(h, j, n=1500, sweeps=30, rng=rng)
    weights = sequence_weights(states.astype(np.uint8))
    model = ap.AttentionPotts(ap.AttentionPottsConfig(length, heads=16, dim_head=8, nb_features=16))
    info = ap.fit(model, states, weights, seconds=120, max_steps=300, batch_size=256, progress=False)
    assert info["steps"] == 300 and math.isfinite(info["loss"])
    scores = apc(model.coupling_norms())
    i, k = np.triu_indices(length, 1)
    top = {(int(i[t]), int(k[t])) for t in np.argsort(-scores[i, k])[:2]}
    assert top == set(strong), (top, info)


def _gibbs():
    """The Potts baseline tests' Gibbs sampler (tests/benchmarks/test_potts.py)."""
    spec = importlib.util.spec_from_file_location(
        "_potts_tests", BENCH.parent / "tests" / "benchmarks" / "test_potts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gibbs_sample


def test_save_and_load_give_the_same_model(tmp_path):
    model = tiny("favor_relu").float()
    path = ap.save(model, tmp_path / "m.ckpt", query="ACDEFGH", positions=[0, 1, 2, 3, 4, 5, 6])
    loaded, extra = ap.load(path)
    assert loaded.config == model.config and extra == {"query": "ACDEFGH", "positions": [0, 1, 2, 3, 4, 5, 6]}
    np.testing.assert_allclose(loaded.coupling_norms(), model.coupling_norms(), rtol=0, atol=0)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an attention-Potts model"):
        ap.load(tmp_path / "other.ckpt")


def test_config_is_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        ap.AttentionPottsConfig(10, attention="linear")
    with pytest.raises(ValueError, match="at least 2 columns"):
        ap.AttentionPottsConfig(1)
    with pytest.raises(ValueError, match="do not fit"):
        ap.fit(ap.AttentionPotts(ap.AttentionPottsConfig(5)), np.zeros((3, 4), dtype=np.int64), np.ones(3), 1.0)
