"""PerformerLM: shapes, masks, causality, attention maps, checkpointing, weight transfer, redraw."""

from __future__ import annotations

import math

import pytest
import torch

from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.model.rotary import apply_rotary, rotary_tables
from protein_performer.training.callbacks import feature_seed, redraw_model_features

pytestmark = pytest.mark.usefixtures("single_thread")


SMALL = dict(dim=32, depth=2, heads=4, dim_head=8, ff_dim=64, nb_features=32, dropout=0.0, max_len=64)
ATTN = ["favor_softmax", "favor_relu", "exact"]


def tokens_and_mask(b=2, length=24, pad_from=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 29, (b, length), generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    if b > 1:
        mask[1, pad_from:] = True
    tokens[mask] = 0
    return tokens, mask


@pytest.mark.parametrize("attention", ATTN)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_shapes_and_attention_maps(attention, causal):
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(attention=attention, causal=causal, **SMALL)).eval()
    tokens, mask = tokens_and_mask()
    out = model(tokens, key_padding_mask=mask, return_attention=True)
    assert out["logits"].shape == (2, 24, 29)
    maps = out["attentions"]
    assert len(maps) == SMALL["depth"]
    for a in maps:
        assert a.shape == (2, SMALL["heads"], 24, 24)
        assert torch.allclose(a.sum(-1), torch.ones(2, SMALL["heads"], 24), atol=1e-4)  # rows sum to 1
        assert (a >= -1e-6).all()
        assert a[1, :, :, 17:].abs().max() < 1e-6  # padded keys get no weight
        if causal:
            assert torch.triu(a, diagonal=1).abs().max() < 1e-6
    # the logits do not depend on whether the maps were asked for
    assert torch.allclose(model(tokens, key_padding_mask=mask)["logits"], out["logits"], atol=1e-6)


@pytest.mark.parametrize("attention", ATTN)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_maps_and_representations_are_the_forward_pass(attention, causal):
    """``attention_maps`` yields ``forward(return_attention=True)``'s maps one layer at a time (a
    layer's maps before its block runs; blocks past the last layer asked for never run);
    ``representations`` is the final LayerNorm's output (what embed computed by hand), and the LM
    head on it gives the logits."""
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(attention=attention, causal=causal, **{**SMALL, "depth": 3})).eval()
    tokens, mask = tokens_and_mask()
    with torch.no_grad():
        full = model(tokens, key_padding_mask=mask, return_attention=True)
        x = model.embed(tokens)
        for block in model.blocks:
            x = block(x, mask)
        by_hand = model.norm(x)
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    maps = model.attention_maps(tokens, mask)
    for layer in range(3):
        got_layer, got = next(maps)
        assert got_layer == layer and ran == list(range(layer))  # blocks 0 .. layer-1 have run
        assert not got.requires_grad and torch.equal(got, full["attentions"][layer])
    assert next(maps, None) is None and ran == [0, 1]  # the last block is not needed for maps
    ran.clear()
    assert [layer for layer, _ in model.attention_maps(tokens, mask, layers=[1, 0, 1])] == [0, 1]
    assert ran == [0]
    assert list(model.attention_maps(tokens, mask, layers=[])) == [] and ran == [0]
    with pytest.raises(ValueError, match="outside"):
        next(model.attention_maps(tokens, mask, layers=[3]))
    with torch.no_grad():
        rep = model.representations(tokens, mask)
        states = list(model.hidden_states(tokens, mask))
    assert len(states) == 4 and torch.equal(states[0], model.embed(tokens)) and torch.equal(states[-1], rep)
    assert torch.equal(rep, by_hand)
    assert torch.equal(model.lm_head(rep), full["logits"])


@pytest.mark.parametrize("attention", ATTN)
def test_causal_model_ignores_the_future(attention):
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(attention=attention, causal=True, **SMALL)).eval()
    tokens, _ = tokens_and_mask(b=1, length=20)
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] - 4 + 5) % 25 + 4
    a, b = model(tokens)["logits"], model(changed)["logits"]
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("attention", ATTN)
def test_padding_does_not_change_real_positions(attention):
    """An item padded to a longer batch gives the same logits on its real tokens."""
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(attention=attention, causal=False, **SMALL)).eval()
    tokens, _ = tokens_and_mask(b=1, length=15)
    padded = torch.cat([tokens, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[0, 15:] = True
    alone = model(tokens)["logits"]
    inbatch = model(padded, key_padding_mask=mask)["logits"][:, :15]
    assert torch.allclose(alone, inbatch, atol=1e-4)


def test_favor_softmax_approximates_exact_with_many_features():
    """Same weights, exact vs FAVOR+ softmax with m large: the logits agree to O(1/sqrt(m))."""
    torch.manual_seed(0)
    cfg = dict(SMALL, nb_features=4096)
    exact = PerformerLM(PerformerConfig(attention="exact", **cfg)).eval()
    favor = PerformerLM(PerformerConfig(attention="favor_softmax", **cfg)).eval()
    favor.load_backbone(exact.state_dict())
    tokens, mask = tokens_and_mask()
    le, lf = exact(tokens, mask)["logits"], favor(tokens, mask)["logits"]
    rel = (le - lf).norm() / le.norm()
    assert rel < 0.05, rel


def test_exact_weights_load_into_favor_model():
    torch.manual_seed(0)
    exact = PerformerLM(PerformerConfig(attention="exact", **SMALL))
    favor = PerformerLM(PerformerConfig(attention="favor_relu", **SMALL))
    before = {k: v.clone() for k, v in favor.state_dict().items()}
    result = favor.load_backbone(exact.state_dict())
    # only the random projections are missing, one per layer; nothing is unexpected
    assert sorted(result.missing) == sorted(favor.feature_buffer_names())
    assert len(result.missing) == SMALL["depth"] and result.unexpected == []
    exact_sd, favor_sd = exact.state_dict(), favor.state_dict()
    for k, v in exact_sd.items():
        assert torch.equal(favor_sd[k], v), k
    for k in favor.feature_buffer_names():  # the FAVOR+ model keeps its own features
        assert torch.equal(favor_sd[k], before[k])
    # and back: a FAVOR+ model's weights load into an exact one (its projections are ignored)
    back = PerformerLM(PerformerConfig(attention="exact", **SMALL))
    result = back.load_backbone({"model." + k: v for k, v in favor.state_dict().items()})
    assert result.missing == [] and len(result.unexpected) == SMALL["depth"]
    with pytest.raises(RuntimeError, match="do not fit"):
        PerformerLM(PerformerConfig(attention="exact", **dict(SMALL, depth=1))).load_backbone(exact.state_dict())


def test_parameter_names_identical_across_attention_kinds():
    names = [
        sorted(n for n, _ in PerformerLM(PerformerConfig(attention=a, causal=c, **SMALL)).named_parameters())
        for a in ATTN
        for c in (False, True)
    ]
    assert all(n == names[0] for n in names)
    assert "blocks.1.attn.to_q.weight" in names[0]


@pytest.mark.parametrize("attention", ["favor_softmax", "favor_relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_checkpointing_gives_the_same_gradients(attention, causal):
    """Activation checkpointing (non-reentrant) recomputes the blocks, FAVOR+'s custom causal
    autograd included: loss and gradients equal those without checkpointing, dropout on."""
    cfg = dict(SMALL, dropout=0.1)
    torch.manual_seed(0)
    plain = PerformerLM(PerformerConfig(attention=attention, causal=causal, **cfg)).train()
    ckpt = PerformerLM(PerformerConfig(attention=attention, causal=causal, checkpointing=True, **cfg)).train()
    ckpt.load_state_dict(plain.state_dict())
    tokens, mask = tokens_and_mask()
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        loss = model(tokens, key_padding_mask=mask)["logits"].float().pow(2).mean()
        model.zero_grad()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for n, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][n], atol=1e-5, rtol=1e-4), n


def test_rotary_positions_are_relative():
    """Rotary q.k depends on the offset between positions only."""
    cos, sin = rotary_tables(16, 8, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    qs = apply_rotary(q.expand(1, 1, 16, 8), cos, sin)[0, 0]
    ks = apply_rotary(k.expand(1, 1, 16, 8), cos, sin)[0, 0]
    assert torch.allclose(qs[3] @ ks[1], qs[10] @ ks[8], atol=1e-5)
    assert torch.allclose(qs[0] @ ks[0], q @ k, atol=1e-5)
    model = PerformerLM(PerformerConfig(attention="favor_relu", positions="rotary", **SMALL))
    assert model.pos_emb is None
    assert model(torch.randint(4, 29, (1, 100)))["logits"].shape == (1, 100, 29)  # no max_len limit


def test_learned_positions_reject_too_long_input():
    model = PerformerLM(PerformerConfig(attention="exact", **SMALL))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(4, 29, (1, SMALL["max_len"] + 1)))


def test_tied_embeddings_and_parameter_count():
    tied = PerformerLM(PerformerConfig(attention="exact", **SMALL))
    untied = PerformerLM(PerformerConfig(attention="exact", tie_embeddings=False, **SMALL))
    assert tied.lm_head.weight is tied.token_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 29 * SMALL["dim"]
    d, f, depth = SMALL["dim"], SMALL["ff_dim"], SMALL["depth"]
    per_block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # q k v out, ff, 2 LayerNorms
    expected = 29 * d + SMALL["max_len"] * d + depth * per_block + 2 * d + 29  # emb, pos, blocks, norm, head bias
    assert tied.num_parameters() == expected
    assert tied.summary()["params_per_block"] == per_block


def test_paper_size_parameter_count():
    """36 x (d 512, d_ff 1024) + embeddings: the paper's protein model, about 76M parameters."""
    with torch.device("meta"):
        model = PerformerLM(PerformerConfig(attention="exact"))
    per_block = 4 * (512 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 512 + 512) + 4 * 512
    assert model.num_parameters(exclude_embeddings=True) == 36 * per_block + 2 * 512 + 29
    assert math.isclose(model.num_parameters() / 1e6, 76.24, rel_tol=1e-3)


def test_redraw_is_deterministic_per_step_and_layer():
    a = PerformerLM(PerformerConfig(attention="favor_softmax", **SMALL))
    b = PerformerLM(PerformerConfig(attention="favor_softmax", **dict(SMALL, favor_kwargs={"seed": 99})))
    names = sorted(a.feature_buffer_names())
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert not torch.equal(sd_a[names[0]], sd_b[names[0]])  # different initial draws
    assert not torch.equal(sd_a[names[0]], sd_a[names[1]])  # layers differ from each other
    redraw_model_features(a, seed=7, step=3000)
    redraw_model_features(b, seed=7, step=3000)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    for n in names:
        assert torch.equal(sd_a[n], sd_b[n]), n
    assert not torch.equal(sd_a[names[0]], sd_a[names[1]])
    before = sd_a[names[0]].clone()
    redraw_model_features(a, seed=7, step=4000)
    assert not torch.equal(a.state_dict()[names[0]], before)
    assert feature_seed(7, 3000, 0) == feature_seed(7, 3000, 0) != feature_seed(7, 3000, 1)
    exact = PerformerLM(PerformerConfig(attention="exact", **SMALL))
    redraw_model_features(exact, seed=7, step=0)  # no-op, no error
    assert exact.feature_buffer_names() == set()


def test_config_is_checked_once_and_built_from_either_form():
    """PerformerConfig checks its values when made; PerformerLM takes it, or its fields as keywords
    (Hydra's ``_target_`` in conf/model), never both; both forms build the same model."""
    with pytest.raises(ValueError, match="attention must be one of"):
        PerformerConfig(attention="linear")
    with pytest.raises(ValueError, match="positions must be one of"):
        PerformerConfig(positions="sinusoidal")
    with pytest.raises(ValueError, match="rotary positions need an even dim_head"):
        PerformerConfig(positions="rotary", dim_head=7)
    with pytest.raises(TypeError):
        PerformerConfig(attention_kind="exact")
    config = PerformerConfig(attention="favor_relu", causal=1, **SMALL)
    assert config.causal is True and config.favor_kwargs == {}
    with pytest.raises(TypeError, match="not both"):
        PerformerLM(config, depth=1)
    torch.manual_seed(0)
    a = PerformerLM(config)
    torch.manual_seed(0)
    b = PerformerLM(attention="favor_relu", causal=True, **SMALL)
    assert b.config == config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same draws, same order
