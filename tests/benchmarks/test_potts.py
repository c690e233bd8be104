"""The Potts-model baseline (benchmarks/potts.py): the vectorised pseudo-likelihood equals explicit
loops over sequences, positions and the q states of each conditional; its gradient passes
gradcheck; a model fitted on a Gibbs sample of a Potts model with two strong couplings ranks those
two pairs first."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protein_performer.recipes.family_contacts.msa import GAP, sequence_weights

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the benchmark scripts import their _record as a top-level module
potts = importlib.import_module("potts")


def brute_force_loss(h, j, states, weights, lambda_h, lambda_j):
    """The loss from its definition, one sequence, position and state at a time."""
    n_seq, length = states.shape
    q = h.shape[1]
    total = 0.0
    for n in range(n_seq):
        for i in range(length):
            energy = [h[i, a] + sum(j[i, k, a, states[n, k]] for k in range(length) if k != i) for a in range(q)]
            log_z = math.log(sum(math.exp(e) for e in energy))
            total -= weights[n] * (energy[states[n, i]] - log_z)
    pairs = sum((j[i, k] ** 2).sum() for i in range(length) for k in range(i + 1, length))
    return total + lambda_h * (h**2).sum() + lambda_j * pairs


def test_states_map_amino_acids_and_gaps():
    tokens = np.array([[4, 23, GAP, 27, 24]], dtype=np.uint8)  # A, Y, gap, X, B
    np.testing.assert_array_equal(potts.potts_states(tokens), [[0, 19, 20, 20, 20]])
    assert potts.pair_penalty(10) == pytest.approx(0.01 * 9 * 20)


def test_couplings_are_symmetric_with_zero_diagonal_blocks():
    length, q = 4, 3
    w = torch.randn(length * q, length * q, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    j = potts.couplings(w, length, q).permute(0, 2, 1, 3)  # (i, j, a, b)
    torch.testing.assert_close(j, j.permute(1, 0, 3, 2), rtol=0, atol=0)
    assert all(torch.count_nonzero(j[i, i]) == 0 for i in range(length))
    assert torch.count_nonzero(j[0, 1]) == q * q


def test_vectorised_pseudo_likelihood_equals_brute_force():
    rng = np.random.default_rng(1)
    length, n_seq, q = 4, 6, potts.Q
    states = rng.integers(0, q, size=(n_seq, length))
    weights = rng.uniform(0.2, 1.0, size=n_seq)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(length, q, dtype=torch.float64, generator=gen)
    w = torch.randn(length * q, length * q, dtype=torch.float64, generator=gen)
    lambda_h, lambda_j = 0.01, potts.pair_penalty(length)
    got = potts.neg_pseudo_log_likelihood(h, w, torch.as_tensor(states), torch.as_tensor(weights), lambda_h)
    j = potts.couplings(w, length, q).permute(0, 2, 1, 3).numpy()
    expected = brute_force_loss(h.numpy(), j, states, weights, lambda_h, lambda_j)
    # float64 sums of ~500 terms of size ~10: agreement to ~1e-13 relative
    assert float(got) == pytest.approx(expected, rel=1e-11)
    # the data term alone (no penalty) too, so a wrong penalty cannot hide a wrong likelihood
    got0 = potts.neg_pseudo_log_likelihood(h, w, torch.as_tensor(states), torch.as_tensor(weights), 0.0, 0.0)
    assert float(got0) == pytest.approx(brute_force_loss(h.numpy(), j, states, weights, 0.0, 0.0), rel=1e-11)


def test_gradient_passes_gradcheck():
    rng = np.random.default_rng(2)
    length, q = 3, 4
    states = torch.as_tensor(rng.integers(0, q, size=(5, length)))
    weights = torch.as_tensor(rng.uniform(0.2, 1.0, size=5))
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(length, q, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(length * q, length * q, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w: potts.neg_pseudo_log_likelihood(h, w, states, weights, 0.05, 0.3), (h, w)
    )


def gibbs_sample(h: np.ndarray, j: np.ndarray, n: int, sweeps: int, rng: np.random.Generator) -> np.ndarray:
    """n independent Gibbs chains of the Potts model (h (L, q), J (L, L, q, q)), ``sweeps`` sweeps each."""
    length, q = h.shape
    x = rng.integers(0, q, size=(n, length))
    rows = np.arange(n)
    for _ in range(sweeps):
        for i in range(length):
            energy = h[i] + sum(j[i, k][:, x[:, k]].T for k in range(length) if k != i)  # (n, q)
            p = np.exp(energy - energy.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            x[rows, i] = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return x


def test_fit_ranks_the_two_strong_couplings_first():
    rng = np.random.default_rng(3)
    length, q = 10, potts.Q
    h = rng.normal(0, 0.5, size=(length, q))
    j = np.zeros((length, length, q, q))
    strong = [(1, 6), (3, 9)]
    for a, b in strong:  # the same amino acid at both ends is favoured
        j[a, b, :20, :20] = j[b, a, :20, :20] = 2.5 * np.eye(20)
    states = gibbs_sample(h, j, n=1500, sweeps=30, rng=rng)
    same = [(states[:, a] == states[:, b]).mean() for a, b in strong]
    assert min(same) > 0.2  # the sample carries the couplings (independent: ~0.05)
    weights = sequence_weights(states.astype(np.uint8))
    _, fitted, info = potts.fit(states, weights, max_iter=40, dtype=torch.float64)
    scores = potts.contact_scores(fitted)
    i, k = np.triu_indices(length, 1)
    top = {(int(i[t]), int(k[t])) for t in np.argsort(-scores[i, k])[:2]}
    assert top == set(strong), (top, info)
    np.testing.assert_allclose(fitted, fitted.transpose(1, 0, 3, 2), atol=1e-12)


def test_on_query_places_columns():
    out = potts.on_query(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 3]), 4)
    assert out[1, 3] == 1.0 and np.isnan(out[0, 1]) and np.isnan(out).sum() == 12
