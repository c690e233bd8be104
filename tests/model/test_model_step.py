"""Token-by-token decoding through the model's public methods (PerformerLM / Block /
MultiHeadAttention / kernel ``step``), against the full causal forward on the same prefix."""

from __future__ import annotations

import pytest
import torch

from protein_performer.model.attention import SoftmaxAttention
from protein_performer.model.performer import PerformerConfig, PerformerLM, RecurrentState
from protein_performer.model.rotary import apply_rotary, rotary_tables

SHAPE = dict(vocab_size=29, max_len=64, dim=32, depth=2, heads=2, dim_head=16, ff_dim=64, dropout=0.0, nb_features=32)


def causal_model(attention: str, positions: str) -> PerformerLM:
    """float64, weights scaled up so that attention is far from uniform (the checks bite)."""
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(attention=attention, causal=True, positions=positions, **SHAPE)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def test_rotary_tables_at_an_offset_are_rows_of_the_full_table():
    """One function for the angles: the rows start.. of the full table, bit for bit (each angle
    is one float32 product p * base^(-2i/d) either way)."""
    cos, sin = rotary_tables(50, 16, "cpu", torch.float32)
    for start, length in ((0, 1), (17, 1), (30, 20)):
        c, s = rotary_tables(length, 16, "cpu", torch.float32, start=start)
        assert c.shape == (length, 8)
        assert torch.equal(c, cos[start : start + length]) and torch.equal(s, sin[start : start + length])


@pytest.mark.parametrize(
    "attention,positions",
    [("favor_softmax", "rotary"), ("favor_relu", "learned"), ("exact", "rotary"), ("exact", "learned")],
)
def test_attention_and_block_steps_equal_the_last_row_of_forward(attention, positions):
    """MultiHeadAttention.step and Block.step at position t equal row t of the causal forward on
    x[:, :t+1], up to float64 rounding (a few hundred operations deep: 1e-10)."""
    model = causal_model(attention, positions)
    block = model.blocks[0]
    x = torch.randn(2, 12, SHAPE["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full_attn, full_block = block.attn(block.ln1(x)), block(x)
    state_attn = state_block = block.attn.init_state(2, "cpu", torch.float64)
    for t in range(12):
        out_attn, state_attn = block.attn.step(block.ln1(x[:, t : t + 1]), t, state_attn)
        out_block, state_block = block.step(x[:, t : t + 1], t, state_block)
        assert out_attn.shape == out_block.shape == (2, 1, SHAPE["dim"])
        torch.testing.assert_close(out_attn[:, 0], full_attn[:, t], rtol=0, atol=1e-10)
        torch.testing.assert_close(out_block[:, 0], full_block[:, t], rtol=0, atol=1e-10)
    assert full_attn.abs().max() > 0.1  # not vacuous


def test_model_step_equals_forward_and_state_advances():
    model = causal_model("favor_softmax", "learned")
    tokens = torch.randint(4, 29, (3, 20), generator=torch.Generator().manual_seed(2))
    full = model(tokens)["logits"]
    state = model.init_state(3)
    assert isinstance(state, RecurrentState) and state.position == 0 and len(state.layers) == SHAPE["depth"]
    for t in range(20):
        logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-10)
    assert state.position == 20


def test_softmax_step_is_the_kv_cache_softmax():
    """SoftmaxAttention.step by hand: softmax(q_t K^T / sqrt(d)) V over the keys fed so far."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=g) for _ in range(3))
    core = SoftmaxAttention(causal=True)
    state = core.init_state(1, 2, 8, dtype=torch.float64)
    for t in range(5):
        out, state = core.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        scores = torch.einsum("bhd,bhkd->bhk", q[:, :, t], k[:, :, : t + 1]) / 8**0.5  # (1, 2, t+1)
        weights = torch.softmax(scores, dim=-1)
        expected = torch.einsum("bhk,bhkd->bhd", weights, v[:, :, : t + 1])
        torch.testing.assert_close(out[:, :, 0], expected, rtol=0, atol=1e-12)
    assert state.k.shape == (1, 2, 5, 8) and state.v.shape == (1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="causal"):
        SoftmaxAttention(causal=False).step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)


def test_stepping_needs_a_causal_model_with_steppable_kernels():
    with pytest.raises(ValueError, match="causal"):
        PerformerLM(PerformerConfig(attention="exact", causal=False, **SHAPE)).init_state(1)
    model = causal_model("exact", "learned")
    model.blocks[1].attn.kernel = torch.nn.Identity()
    with pytest.raises(TypeError, match="layer 1: cannot step a Identity"):
        model.init_state(1)


def test_rotary_step_uses_the_position():
    """A rotary step at position p rotates q and k by p's angles: shifting the position changes
    the output (the check above would pass if every step used position 0 only for t = 0)."""
    model = causal_model("exact", "rotary")
    attn = model.blocks[0].attn
    x = torch.randn(1, 1, SHAPE["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q0, _ = attn.queries_keys(x, start=0)
    q5, _ = attn.queries_keys(x, start=5)
    cos, sin = rotary_tables(1, SHAPE["dim_head"], "cpu", torch.float64, start=5)
    torch.testing.assert_close(q5, apply_rotary(q0, cos, sin), rtol=0, atol=1e-12)  # q0: angle 0, no rotation
    assert not torch.allclose(q0, q5)
