"""The pieces of the issue-6 studies (protein_performer.studies), on small real inputs.

The long runs themselves are commands (see benchmarks/results/studies.md); these tests check the
measurements they are built from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protein_performer.model.attention import SoftmaxAttention
from protein_performer.studies import (
    approximation,
    causal_generation,
    compatibility,
    pretrained,
    redraw,
    reports,
    sequences,
    small_training,
    speed,
)

TINY = dict(vocab_size=29, max_len=64, dim=32, depth=2, heads=2, dim_head=16, ff_dim=64, dropout=0.0)


@pytest.fixture(scope="module")
def seqs():
    s, counts = sequences.load_sequences(sequences.SAMPLE, max_records=200)
    assert counts["kept"] == 200 and counts["rejected_unknown_residue"] == 0
    return s


# ------------------------------------------------------------------------------------ study 1
def test_errors_are_zero_for_exact_and_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    ref = approximation.Reference(q, k, v)
    exact = ref.exact
    torch.testing.assert_close(ref.out, SoftmaxAttention()(q, k, v), rtol=1e-5, atol=1e-6)
    assert all(x == 0 for x in approximation.errors(exact.clone(), ref).values())
    approx = exact + 0.01  # a constant offset: every entry errs by 0.01, the output by 0.01 * sum(v)
    e = approximation.errors(approx, ref)
    assert e["mse_attn"] == pytest.approx(1e-4, rel=1e-4)
    assert e["mse_small"] == pytest.approx(1e-4, rel=1e-4)
    assert e["mse_out"] == pytest.approx(float((0.01 * v.sum(dim=2, keepdim=True)).pow(2).mean()), rel=1e-4)
    small = exact <= exact.flatten(2).kthvalue(int(0.1 * 400), dim=-1).values[..., None, None]
    assert e["relerr_small"] == pytest.approx(float((0.01 / exact)[small].mean()), rel=1e-4)


def test_trig_uses_sin_and_cos_of_m_directions():
    pos = approximation.favor_module("positive", True, 16, 32, seed=0)
    trig = approximation.favor_module("trig", True, 16, 32, seed=0)
    assert pos.projection.shape == (32, 16) and trig.projection.shape == (32, 16)
    assert trig.nb_features == 64
    with pytest.raises(ValueError):
        approximation.favor_module("cosine", True, 16, 32, seed=0)


def test_sweep_reproduces_the_papers_orderings_on_synthetic_data():
    """L = 256, d = 16, q, k ~ N(0, 0.25 I), 8 samples (seeded, so deterministic): the error falls
    with m; orthogonal features beat iid; positive features beat trigonometric ones where attention
    is small."""
    data = approximation.synthetic_data(256, 16, 0.5, seed=0, device="cpu")
    res = approximation.sweep(data, 16, [16, 128], samples=8, seed=0, label="test", progress=False)
    mean = lambda cfg, m, key: res[cfg][m][key]["mean"]  # noqa: E731
    for cfg in ("positive/orthogonal", "positive/iid"):
        # unbiased Monte-Carlo estimator: MSE ~ 1/m, so 8x the features must cut it by well over 2x
        assert mean(cfg, 128, "mse_attn") < mean(cfg, 16, "mse_attn") / 2
    assert mean("positive/orthogonal", 128, "mse_attn") < mean("positive/iid", 128, "mse_attn")
    assert mean("positive/orthogonal", 16, "mse_small") < mean("trig/orthogonal", 16, "mse_small")
    assert len(res["trig/iid"][16]["mse_out"]["values"]) == 8
    c = approximation.claims(res, [16, 128])
    assert c["positive_below_trig_small_entries"]["fraction"] == 1.0


def test_capture_qkv_gives_the_models_own_attention(seqs):
    model = small_training.build_model("exact", False, 0, **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)  # sharper attention than at initialisation
    tokens = torch.from_numpy(seqs[0][:40].astype(np.int64))[None].clone()
    layers = pretrained.capture_qkv(model, tokens)
    maps = model(tokens, return_attention=True)["attentions"]
    assert len(layers) == TINY["depth"]
    for (q, k, v), att in zip(layers, maps):
        assert q.shape == k.shape == v.shape == (1, TINY["heads"], 40, TINY["dim_head"])
        torch.testing.assert_close(SoftmaxAttention().attention_matrix(q, k), att, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ study 2
def test_identity_core_and_measure():
    model = speed.build("identity", 64, False, dim=32, depth=2, heads=2, ff_dim=32, nb_features=16, seed=0)
    assert all(isinstance(b.attn.kernel, speed.IdentityAttention) for b in model.blocks)
    v = torch.randn(1, 2, 8, 16)
    assert speed.IdentityAttention()(v, v, v) is v
    args = dict(
        device="cpu", seed=0, causal=False, dim=32, depth=1, heads=2, ff_dim=32, nb_features=16, dtype="fp32", reps=1
    )
    row = speed.measure("favor_softmax", 128, args)
    for mode in ("forward", "forward_backward"):
        assert row[mode]["time_s"] > 0 and row[mode]["peak_bytes"] >= 0


def test_speed_sweep_stops_at_the_time_cap(tmp_path):
    args = speed.parse_args(
        [
            "--cores",
            "favor_relu",
            "--min-length",
            "64",
            "--max-length",
            "256",
            "--dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--ff-dim",
            "32",
            "--nb-features",
            "16",
            "--reps",
            "1",
            "--time-cap",
            "1e-9",
            "--out-dir",
            str(tmp_path),
            "--markdown",
            str(tmp_path / "s.md"),
        ]
    )
    rows, meta = speed.sweep(args, progress=False)
    assert [r["length"] for r in rows] == [64]  # the projection from L = 64 exceeds the cap: nothing longer runs
    assert "time cap" in meta["stops"]["favor_relu"] and meta["lengths"] == [64, 128, 256]
    assert rows[0]["forward_backward"]["time_s"] > 0 and rows[0]["forward_backward"]["peak_bytes"] >= 0
    assert speed.largest(rows) == {"favor_relu": 64}


# ------------------------------------------------------------------------------------ studies 3, 4 and training
def test_train_is_deterministic_learns_and_caches(seqs, tmp_path):
    cfg = small_training.TrainConfig(
        objective="bid", max_length=48, batch_size=8, steps=8, lr=3e-3, warmup_steps=2, seed=3
    )
    valid = sequences.eval_batches(seqs[:16], "bid", 48, 16)
    a = small_training.build_model("favor_relu", False, 0, nb_features=16, **TINY)
    before = small_training.evaluate(a, valid)
    h1 = small_training.fit_small_model(a, seqs[16:], cfg, progress=False)
    b = small_training.build_model("favor_relu", False, 0, nb_features=16, **TINY)
    h2 = small_training.fit_small_model(b, seqs[16:], cfg, progress=False)
    assert [h["train_loss"] for h in h1] == [h["train_loss"] for h in h2]
    after = small_training.evaluate(a, valid)
    assert after["loss"] < before["loss"] - 0.05  # from ~log(29) = 3.37 towards the residue frequencies
    assert before["loss"] == pytest.approx(math.log(29), abs=0.1)
    # pretrained(): trains once, the second call loads the same weights from the cache
    fasta = tmp_path / "s.fasta"
    fasta.write_text(
        "".join(
            f">s{i}\n" + "".join("ACDEFGHIKLMNPQRSTVWY"[j % 20] for j in range(i, i + 60)) + "\n" for i in range(30)
        )
    )
    m1, meta1 = pretrained.pretrained("exact", "bid", TINY, cfg, fasta, cache_dir=tmp_path / "c", progress=False)
    m2, meta2 = pretrained.pretrained("exact", "bid", TINY, cfg, fasta, cache_dir=tmp_path / "c", progress=False)
    assert not meta1["cached"] and meta2["cached"]
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), n


def test_redraw_schedule_and_fresh_draw_eval(seqs):
    model = small_training.build_model("favor_softmax", False, 0, nb_features=16, **TINY)
    proj = lambda: model.blocks[0].attn.kernel.projection.clone()  # noqa: E731
    p0 = proj()
    fixed, every3 = redraw.redraw_schedule(0, 0), redraw.redraw_schedule(0, 3)
    for s in range(5):
        fixed(s, model)
    assert torch.equal(proj(), p0)
    every3(0, model)
    assert torch.equal(proj(), p0)  # step 0 keeps the initial draw
    every3(3, model)
    p3 = proj()
    assert not torch.equal(p3, p0)
    every3(4, model)
    assert torch.equal(proj(), p3)
    valid = sequences.eval_batches(seqs[:8], "bid", 48, 8)
    own = small_training.evaluate(model, valid)
    fresh = redraw.fresh_draw_eval(model, valid, seed=0, draws=2, device="cpu")
    assert len(fresh) == 2 and fresh[0]["loss"] != fresh[1]["loss"]
    assert torch.equal(proj(), p3) and small_training.evaluate(model, valid)["loss"] == own["loss"]  # features restored


def test_swap_keeps_every_weight_and_softmax_features_approximate_exact(seqs):
    exact = small_training.build_model("exact", False, 0, **TINY).eval()
    tokens = torch.from_numpy(seqs[1][:60].astype(np.int64))[None].clone()
    ref = exact(tokens)["logits"]
    soft = compatibility.swap(exact, "favor_softmax", TINY, nb_features=1024, seed=1)
    relu = compatibility.swap(exact, "favor_relu", TINY, nb_features=64, seed=1)
    for m in (soft, relu):
        for name, p in exact.named_parameters():
            assert torch.equal(dict(m.named_parameters())[name], p)
    err_soft = (soft(tokens)["logits"] - ref).abs().max().item()
    err_relu = (relu(tokens)["logits"] - ref).abs().max().item()
    assert err_soft < 0.05  # m = 1024 positive features: close to exact softmax
    assert err_relu > 0  # another kernel: not the same function


# ------------------------------------------------------------------------------------ study 5 helpers
def test_generation_helpers(seqs):
    allowed = causal_generation.residue_mask(29)
    assert allowed.sum() == 21 and allowed[2] and not allowed[0] and not allowed[3]
    stream = causal_generation.token_stream(seqs[:3], 3000)
    assert stream.shape == (1, 3000) and stream[0, 0] == 1
    n0 = len(seqs[0])
    assert stream[0, n0 + 1] == 2 and stream[0, n0 + 2] == 1  # eos then the next bos
    model = small_training.build_model("favor_softmax", True, 0, nb_features=16, **TINY)
    other = causal_generation.in_dtype(model)
    assert next(other.parameters()).dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    assert [k.eps for _, k in other.attention_kernels()] == [k.eps for _, k in model.attention_kernels()]
    comp = causal_generation.composition([[4, 4, 5], [2, 6]])  # A, A, C and eos (not a residue), D
    assert comp.sum() == pytest.approx(1.0) and comp[0] == pytest.approx(0.5)


def test_markdown_text_replaces_only_its_section(tmp_path):
    path = tmp_path / "studies.md"
    for name, section in (("a", "## A\none"), ("b", "## B\ntwo"), ("a", "## A\nthree")):
        path.write_text(reports.markdown_text(name, section, path))
    text = path.read_text()
    assert text.count("<!-- study:a -->") == 1 and "three" in text and "one" not in text and "## B\ntwo" in text
    assert text.index("## A") < text.index("## B")


def test_memory_growth_projection():
    row = lambda peak: {"forward_backward": {"peak_bytes": peak}}  # noqa: E731
    assert speed.memory_growth(None, row(100)) == 4.0  # one point: assume the worst (quadratic)
    assert speed.memory_growth(row(100), row(200)) == 2.0  # linear (FAVOR+, exact SDPA)
    assert speed.memory_growth(row(100), row(390)) == 3.9  # nearly quadratic (materialised softmax)
    assert speed.memory_growth(row(100), row(150)) == 2.0 and speed.memory_growth(row(100), row(900)) == 4.0
