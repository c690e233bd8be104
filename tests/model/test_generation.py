"""Recurrent causal generation (protein_performer.generation) against full recomputation."""

from __future__ import annotations

import pytest
import torch

from protein_performer.generation import (
    RecurrentState,
    generate,
    generate_recompute,
    init_state,
    prefill,
    sample_next,
    step,
)
from protein_performer.model.performer import PerformerConfig, PerformerLM

SHAPE = dict(vocab_size=29, max_len=128, dim=32, depth=2, heads=2, dim_head=16, ff_dim=64, dropout=0.0, nb_features=32)


def make(
    attention: str, positions: str = "learned", eps: float | None = None, seed: int = 0, scale: float = 3.0
) -> PerformerLM:
    """A causal model in float64 whose matrices are scaled up, so attention is far from uniform."""
    torch.manual_seed(seed)
    kw = {} if eps is None else {"favor_kwargs": {"eps": eps}}
    model = (
        PerformerLM(PerformerConfig(attention=attention, causal=True, positions=positions, **SHAPE, **kw))
        .double()
        .eval()
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def tokens(b: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 29, (b, length), generator=torch.Generator().manual_seed(seed))


# One step equals the causal forward of the whole sequence up to float64 rounding (~1e-16 relative
# per operation, a few hundred operations deep -> 1e-10), FAVOR+ with its default eps floor too: the
# causal forward stabilizes position i with the running max over keys 0..i, as the recurrent state.
@pytest.mark.parametrize(
    "attention,positions",
    [
        ("favor_softmax", "learned"),
        ("favor_relu", "learned"),
        ("favor_softmax", "rotary"),
        ("exact", "learned"),
        ("exact", "rotary"),
    ],
)
def test_prefill_equals_full_forward(attention, positions):
    model = make(attention, positions)
    x = tokens(2, 40)
    full = model(x)["logits"]
    rec, state = prefill(model, x)
    assert state.position == 40
    assert full.abs().max() > 1.0  # the check is not vacuous
    torch.testing.assert_close(rec, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention", ["favor_softmax", "favor_relu", "exact"])
def test_generate_equals_recompute(attention):
    model = make(attention)
    prompt = torch.full((3, 1), 1, dtype=torch.long)
    g1, l1 = generate(model, prompt, 25, 1.0, torch.Generator().manual_seed(5), return_logits=True)
    g2, l2 = generate_recompute(model, prompt, 25, 1.0, torch.Generator().manual_seed(5), return_logits=True)
    assert g1.shape == (3, 26)
    assert torch.equal(g1, g2)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-10)
    # a different seed samples something else: the generator really drives the sampling
    g3 = generate(model, prompt, 25, 1.0, torch.Generator().manual_seed(6))
    assert not torch.equal(g1, g3)


def test_default_eps_matches_prefix_recompute_in_float32():
    """With the default eps the step equals the forward of the *prefix* (same running stabilizer):
    the recomputation of every prefix of the generated tokens (generate_recompute's logits, fed the
    same tokens) gives the step's logits to float32 rounding."""
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(attention="favor_softmax", causal=True, **SHAPE)).eval()
    prompt = tokens(2, 5)
    g1, l1 = generate(model, prompt, 30, 1.0, torch.Generator().manual_seed(0), return_logits=True)
    # fed the same tokens, not sampling again: the two float32 paths differ in their last bits (~1e-6),
    # and a draw that close to the boundary between two tokens would sample another one (the float64
    # test above compares sampled tokens: there the paths agree to ~1e-13)
    with torch.no_grad():
        l2 = torch.stack([model(g1[:, : 5 + i])["logits"][:, -1] for i in range(30)], dim=1)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)


def test_favor_state_size_is_constant_exact_cache_grows():
    favor, exact = make("favor_softmax"), make("exact")
    x = tokens(1, 32)
    sizes = {}
    for name, model in (("favor", favor), ("exact", exact)):
        state = init_state(model, 1)
        seen = []
        for t in range(32):
            _, state = step(model, x[:, t], state)
            seen.append(state.nbytes())
        sizes[name] = seen
    assert len(set(sizes["favor"])) == 1  # S (b, h, m, d), z, ... : independent of the position
    m, d, h, depth = SHAPE["nb_features"], SHAPE["dim_head"], SHAPE["heads"], SHAPE["depth"]
    assert sizes["favor"][0] >= depth * h * m * d * 8  # at least S in float64
    assert sizes["exact"][-1] == 32 * sizes["exact"][0]  # k, v caches grow linearly


def test_errors_and_sampling():
    bid = PerformerLM(PerformerConfig(attention="favor_softmax", causal=False, **SHAPE))
    with pytest.raises(ValueError, match="causal"):
        init_state(bid, 1)
    model = make("favor_relu")
    state = RecurrentState(position=SHAPE["max_len"], layers=init_state(model, 1).layers)
    with pytest.raises(ValueError, match="max_len"):
        step(model, torch.tensor([4]), state)
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    allowed = torch.tensor([True, False, True])
    assert sample_next(logits, temperature=0, allowed=allowed).tolist() == [2, 0]
    draws = sample_next(logits[:1].expand(4000, 3), 1.0, torch.Generator().manual_seed(0), allowed)
    assert set(draws.tolist()) <= {0, 2}
    p2 = torch.softmax(torch.tensor([0.0, 1.0]), 0)[1].item()  # P(id 2) among the allowed {0, 2}
    frac = (draws == 2).float().mean().item()
    assert abs(frac - p2) < 4 * (p2 * (1 - p2) / 4000) ** 0.5  # within 4 binomial standard deviations
