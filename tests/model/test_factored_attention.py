"""Factored attention for family models (issue 12): ``PerformerConfig(qk="position")`` takes every
head's queries and keys from learned per-position vectors, so its maps are one pattern per head,
the same for every sequence of a length; ``aligned_row`` writes a family member on the chain's
columns; ``extract_family(align=True)`` and a tiny aligned recipe run on the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protein_performer.analysis.alignment import GAP_RESIDUE, aligned_row
from protein_performer.analysis.contacts.head import ContactHead
from protein_performer.analysis.contacts.predict import predict_contacts
from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.pretrained import load_model
from protein_performer.recipes.family_contacts.extract import extract_family, read_family_fasta
from protein_performer.recipes.family_contacts.run import run
from protein_performer.recipes.family_contacts.scoring import chain_residues


def tiny(attention="exact", **kw):
    torch.manual_seed(0)
    return PerformerLM(
        PerformerConfig(
            max_len=40,
            dim=32,
            depth=2,
            heads=4,
            dim_head=8,
            ff_dim=64,
            dropout=0.0,
            attention=attention,
            nb_features=16,
            qk="position",
            **kw,
        )
    ).eval()


@pytest.mark.parametrize("attention", ["exact", "favor_softmax", "favor_relu"])
def test_position_maps_do_not_depend_on_the_residues(attention):
    model = tiny(attention)
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(4, 24, (1, 30), generator=gen) for _ in range(2))
    with torch.no_grad():
        maps_a = model(a, return_attention=True)["attentions"]
        maps_b = model(b, return_attention=True)["attentions"]
        logits_a, logits_b = model(a)["logits"], model(b)["logits"]
    torch.testing.assert_close(maps_a[0], maps_b[0], rtol=0, atol=0)  # layer 0: positions only
    assert not torch.allclose(logits_a, logits_b)  # the values still carry the residues
    for m in maps_a:  # rows are distributions
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), rtol=1e-5, atol=1e-5)


def _padding(batch: int, length: int) -> torch.Tensor:
    """Padding at the end, at the start, none, and a sequence that is padding only."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, length - 4 :], mask[2, :3], mask[4] = True, True, True
    return mask


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "relu"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("features", [8, 32])  # l = 12, d = 4, b = 5: m = 8 takes V^T K' first, m = 32 Q' K'^T
def test_factored_favor_shares_the_features_and_equals_the_per_sequence_path(
    kernel, positions, padded, features, monkeypatch
):
    """qk="position" FAVOR+ makes Q' and K' once per batch (FavorAttention.shared_forward); its output and
    gradients equal the per-sequence path (the kernel's forward on q, k expanded over the batch).

    float64: both are ratios of sums of <= l m positive terms, so they agree to ~(l + m) u ~ 1e-14
    relative; 1e-10 leaves margin. eps = 0.1 makes the floor count: a floor not rescaled to the
    shared stabilizer, or a padded key left in, moves the output by > 1e-3 relative."""
    torch.manual_seed(0)
    attention = "favor_relu" if kernel == "relu" else "favor_softmax"
    model = PerformerLM(
        max_len=20,
        dim=16,
        depth=1,
        heads=3,
        dim_head=4,
        ff_dim=8,
        dropout=0.0,
        attention=attention,
        nb_features=features,
        qk="position",
        positions=positions,
        favor_kwargs={"eps": 0.1, "kernel": kernel},
    ).double()
    attn = model.blocks[0].attn
    with torch.no_grad():  # spread the keys' scales, so that each sequence's own stabilizer differs
        attn.k_pos.mul_(torch.linspace(1.0, 30.0, 20, dtype=torch.float64)[:, None])
    x = torch.randn(5, 12, 16, dtype=torch.float64)
    mask = _padding(5, 12) if padded else torch.zeros(5, 12, dtype=torch.bool)
    q, k = attn.queries_keys(x)
    expected = attn.merge_heads(attn.kernel(q, k, attn.split_heads(attn.to_v(x)), mask))
    expected_grads = torch.autograd.grad(expected.sin().sum(), list(attn.parameters()))

    def per_sequence(*args, **kwargs):
        raise AssertionError("factored FAVOR+ went through the per-sequence path")

    monkeypatch.setattr(type(attn.kernel), "forward", per_sequence)
    out = attn(x, mask)
    grads = torch.autograd.grad(out.sin().sum(), list(attn.parameters()))
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10 * scale)
    if padded:
        assert out[4].abs().max() == 0  # no real key: zero output, as the per-sequence path gives
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def test_shared_forward_checks_its_inputs():
    from protein_performer.model.favor import FavorAttention

    attn = FavorAttention(4, 8)
    q = k = torch.randn(1, 3, 6, 4)
    with pytest.raises(ValueError, match="must be \\(1, 3, 6, 4\\)"):
        attn.shared_forward(q.expand(2, -1, -1, -1), k, torch.randn(3, 4, 2, 6))
    with pytest.raises(ValueError, match="bidirectional"):
        FavorAttention(4, 8, causal=True).shared_forward(q, k, torch.randn(3, 4, 2, 6))


def test_position_queries_are_parameters_that_learn():
    model = tiny().train()
    attn = model.blocks[0].attn
    assert not hasattr(attn, "to_q") and attn.q_pos.shape == (4, 40, 8) and attn.k_pos.shape == (4, 40, 8)
    tokens = torch.randint(4, 24, (3, 25), generator=torch.Generator().manual_seed(2))
    model(tokens)["logits"].logsumexp(-1).sum().backward()
    assert attn.q_pos.grad[:, :25].abs().sum() > 0 and attn.k_pos.grad[:, :25].abs().sum() > 0
    assert attn.q_pos.grad[:, 25:].abs().sum() == 0  # positions beyond the batch get nothing


def test_position_queries_check_length_and_config():
    with pytest.raises(ValueError, match="max_len 40 of the"):
        tiny()(torch.randint(4, 24, (1, 41)))
    with pytest.raises(ValueError, match="qk must be one of"):
        PerformerLM(PerformerConfig(max_len=8, dim=8, depth=1, heads=1, dim_head=8, ff_dim=8, qk="residues"))
    with pytest.raises(ValueError, match="init must be one of"):
        PerformerLM(PerformerConfig(max_len=8, dim=8, depth=1, heads=1, dim_head=8, ff_dim=8, init="xavier"))


def test_torch_init_keeps_pytorch_defaults():
    normal = PerformerLM(
        PerformerConfig(max_len=8, dim=64, depth=1, heads=2, dim_head=8, ff_dim=16, tie_embeddings=False)
    )
    default = PerformerLM(
        PerformerConfig(max_len=8, dim=64, depth=1, heads=2, dim_head=8, ff_dim=16, tie_embeddings=False, init="torch")
    )
    # N(0, 0.02) vs nn.Embedding's N(0, 1): 29 x 64 draws, the sample std within a few percent
    assert normal.token_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert default.token_emb.weight.std().item() == pytest.approx(1.0, rel=0.1)
    # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    assert default.blocks[0].ff.fc1.weight.std().item() == pytest.approx((3 * 64) ** -0.5, rel=0.1)


def test_aligned_row_keeps_target_columns():
    target = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    inserted = target[:10] + "WWW" + target[10:]  # residues between target positions are dropped
    assert aligned_row(inserted, target) == target
    deleted = target[:12] + target[20:]  # a deletion: those columns are not covered
    row = aligned_row(deleted, target)
    assert len(row) == len(target) and row.count(GAP_RESIDUE) == 8
    assert row[:12] == target[:12] and row[20:] == target[20:]
    assert aligned_row(target[5:], target) == GAP_RESIDUE * 5 + target[5:]  # a shorter domain


def test_extract_family_aligned(tmp_path):
    fasta = tmp_path / "fam.fasta"
    target = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    members = ["MKTAYIAKQRQWWWISFVKSHFSRALEERLGLIEVQ", "AYIAKQRQISFVKSHFSRQLEE", target]
    fasta.write_text("".join(f">s{i}/1-9 PF99999\n{s}\n" for i, s in enumerate(members)))
    out = tmp_path / "family.fasta"
    info = extract_family(fasta, "PF99999", out, target, max_identity=1.0, align=True)
    rows = read_family_fasta(out)
    mutant = target.replace("SRQLEE", "SRALEE")
    assert rows == [mutant, GAP_RESIDUE * 3 + target[3:25] + GAP_RESIDUE * 8, target]
    assert info["n_written"] == 3 and info["aligned_to"] == len(target)
    assert info["covered"] == pytest.approx((33 + 22 + 33) / 99, abs=1e-3)
    # with the hold-out, the chain and its near copies go (identity over the shorter sequence)
    info = extract_family(fasta, "PF99999", out, target, max_identity=0.9, align=True)
    assert info["n_held_out"] == 3 and info["n_written"] == 0 and read_family_fasta(out) == []


@pytest.mark.slow
def test_tiny_aligned_recipe(shared_data, tmp_path):
    out = tmp_path / "fam"
    s = run(
        "PF00226",
        out,
        input=shared_data / "pfam40_domains.fasta.gz",
        structures=shared_data / "structures" / "kortemme40",
        max_sequences=150,
        stages=("extract", "ingest", "train", "export", "score", "contacts"),
        experiment="family_contacts_aligned",
        align=True,
        overrides=["trainer.max_steps=4", "trainer.max_time=null", "model.heads=4", "data.batch_size=8"],
    )
    chain = chain_residues(s.record["structure"])[0]
    rows = read_family_fasta(out / "family.fasta")
    assert len(rows) == 150 and {len(r) for r in rows} == {len(chain)}
    assert s.train["global_step"] == 4 and s.record["experiment"] == "family_contacts_aligned" and s.record["align"]
    assert set(s.record["scores"]["trained"]) == {"mean", "layer0"}
    assert 0.0 <= s.headline["long_P@L"] <= 1.0
    # one layer of factored attention: also scored as Potts couplings (recipes/family_contacts/couplings.py)
    assert s.headline["couplings_long_P@L"] == s.record["scores"]["couplings"]["long"]["P@L"]
    assert 0.0 <= s.headline["couplings_long_P@L"] <= 1.0
    # the recipe is the measured setting (Performer-ReLU, m 64), and its head names the chain it aligned to
    loaded = load_model(out / "checkpoints" / "last.ckpt")
    assert (loaded.model.config.attention, loaded.model.config.nb_features, loaded.model.config.qk) == (
        "favor_relu",
        64,
        "position",
    )
    head = ContactHead.load(out / s.fitted_head["head"])
    assert head.align_to == {"id": Path(s.record["structure"]).stem, "sequence": chain}
    assert head.settings["kind"] == "mean" and s.fitted_head["kind"] == "mean"
    assert "trained_mean" in s.fitted_head["contacts_report"] and "trained_mean" in s.fitted_head["leave_family_out"]
    assert s.fitted_head["align_to"] == Path(s.record["structure"]).stem
    # predict_contacts through the head aligns a family member onto the chain
    member = rows[0].replace("X", "")
    (pred,) = predict_contacts(loaded, head, [member])
    assert pred.contacts.shape == (len(member),) * 2 and len(pred.aligned) >= 0.9 * len(member)
