"""UNI / BID collation, cropping, padding and masking statistics, on real UniProt sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_shards import load_records

from protein_performer.data.collate import IGNORE_INDEX, Collator, mask_tokens
from protein_performer.data.tokenizer import Tokenizer

TOK = Tokenizer()
BOS, EOS, MASK, PAD = TOK.bos_id, TOK.eos_id, TOK.mask_id, TOK.pad_id


@pytest.fixture(scope="module")
def seqs():
    return [t for _, t in load_records(1000)]


def _check_contract(batch, b):
    assert set(batch) == {"tokens", "targets", "key_padding_mask", "index", "lengths"}
    L = batch["tokens"].shape[1]
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (b, L)
    assert batch["targets"].dtype == torch.long and batch["targets"].shape == (b, L)
    assert batch["key_padding_mask"].dtype == torch.bool and batch["key_padding_mask"].shape == (b, L)
    assert batch["index"].dtype == torch.long and batch["index"].shape == (b,)
    assert batch["lengths"].dtype == torch.long and batch["lengths"].shape == (b,)
    pad = batch["key_padding_mask"]
    assert torch.equal(pad, torch.arange(L)[None] >= batch["lengths"][:, None])
    assert (batch["tokens"][pad] == PAD).all() and (batch["targets"][pad] == IGNORE_INDEX).all()
    assert not (batch["tokens"][~pad] == PAD).any()


def test_uni_shift_and_padding(seqs):
    items = seqs[:5]
    col = Collator("uni", max_length=4096, train=True, seed=0, pad_to_multiple_of=8)
    batch = col(items, [10, 11, 12, 13, 14], epoch=0)
    _check_contract(batch, 5)
    n = np.array([s.size for s in items])
    assert batch["lengths"].tolist() == (n + 1).tolist()
    assert batch["tokens"].shape[1] == math.ceil((n.max() + 1) / 8) * 8
    assert batch["index"].tolist() == [10, 11, 12, 13, 14]
    for r, s in enumerate(items):
        tok, tgt = batch["tokens"][r].numpy(), batch["targets"][r].numpy()
        assert tok[0] == BOS and np.array_equal(tok[1 : s.size + 1], s)
        assert np.array_equal(tgt[: s.size], s) and tgt[s.size] == EOS
        # next-token shift: target t is the input at t + 1 within the sequence
        assert np.array_equal(tgt[: s.size], tok[1 : s.size + 1])
        assert (tgt[s.size + 1 :] == IGNORE_INDEX).all()


def test_padding_never_exceeds_max_length(seqs):
    col = Collator("uni", max_length=100, train=False, pad_to_multiple_of=64)
    long = [s for s in seqs if s.size > 200][:3]
    batch = col(long, [0, 1, 2])
    assert batch["tokens"].shape == (3, 100)  # 100 rounded to 128 would overflow max_length
    assert batch["lengths"].tolist() == [100] * 3


def test_uni_crop_random_in_train_fixed_in_eval(seqs):
    s = next(s for s in seqs if s.size > 1500)
    n, L = s.size, 256
    c = np.concatenate([[BOS], s, [EOS]])
    train, evaluate = (
        Collator("uni", max_length=L, train=True, seed=3),
        Collator("uni", max_length=L, train=False, seed=3),
    )
    starts = []
    for epoch in range(400):
        b = train([s], [7], epoch)
        tok, tgt = b["tokens"][0].numpy(), b["targets"][0].numpy()
        assert tok.size == L
        # locate the window: tokens = c[j:j+L], targets = c[j+1:j+L+1]
        j = next(j for j in np.flatnonzero(c[: n + 2 - L] == tok[0]) if np.array_equal(c[j : j + L], tok))
        assert np.array_equal(tgt, c[j + 1 : j + L + 1])
        starts.append(j)
        e = evaluate([s], [7], epoch)
        assert np.array_equal(e["tokens"][0].numpy(), c[:L]) and np.array_equal(e["targets"][0].numpy(), c[1 : L + 1])
    # starts uniform on 0 .. n + 1 - L: mean and the bounds (5 standard errors)
    hi = n + 1 - L
    sd = math.sqrt(((hi + 1) ** 2 - 1) / 12)
    assert abs(np.mean(starts) - hi / 2) < 5 * sd / math.sqrt(len(starts))
    assert min(starts) >= 0 and max(starts) <= hi and len(set(starts)) > 300


def test_bid_crop_keeps_specials_only_at_true_ends(seqs):
    s = next(s for s in seqs if s.size > 1500)
    c = np.concatenate([[BOS], s, [EOS]])
    col = Collator("bid", max_length=128, train=True, seed=1)
    for epoch in range(20):
        b = col([s], [0], epoch)
        tgt, tok = b["targets"][0].numpy(), b["tokens"][0].numpy()
        orig = np.where(tgt != IGNORE_INDEX, tgt, tok)
        j = next(j for j in range(c.size - 127) if np.array_equal(c[j : j + 128], orig))
        assert (tok == BOS).sum() == (j == 0) and (tok == EOS).sum() == (j + 128 == c.size)
    e = Collator("bid", max_length=128, train=False, seed=1)([s], [0])
    orig = torch.where(e["targets"][0] != IGNORE_INDEX, e["targets"][0], e["tokens"][0]).numpy()
    assert np.array_equal(orig, c[:128])
    # 130 tokens in windows of 128: starts 0, 1, 2 each with probability 1/3
    c = np.concatenate([[BOS], s[:128], [EOS]])
    seen = {}
    for epoch in range(60):
        b = col([s[:128]], [0], epoch)
        tok, tgt = b["tokens"][0].numpy(), b["targets"][0].numpy()
        orig = np.where(tgt != IGNORE_INDEX, tgt, tok)
        j = next(j for j in range(3) if np.array_equal(c[j : j + 128], orig))
        seen[j] = seen.get(j, 0) + 1
        assert (tok[0] == BOS) == (j == 0) and (tok[-1] == EOS) == (j == 2)
    assert sorted(seen) == [0, 1, 2]


def test_bid_masking_statistics(seqs):
    """Selection ~ Bernoulli(0.15) per residue (at least one per sequence); 80/10/10 split.

    With n_i residues in sequence i, the number selected is Binomial(n_i, p) plus one forced pick
    when the draw is empty (probability (1 - p)^n_i). Tolerances are 5 standard deviations."""
    p = 0.15
    col = Collator("bid", max_length=10**5, train=True, seed=11)
    batch = col(seqs, list(range(len(seqs))), epoch=2)
    _check_contract(batch, len(seqs))
    tok, tgt, pad = batch["tokens"], batch["targets"], batch["key_padding_mask"]
    n = np.array([s.size for s in seqs])
    sel = tgt != IGNORE_INDEX
    # specials are never selected or altered: bos at 0, eos at n + 1, all in place
    rows = torch.arange(len(seqs))
    assert (tok[:, 0] == BOS).all() and (tok[rows, torch.from_numpy(n + 1)] == EOS).all()
    assert not sel[:, 0].any() and not sel[rows, torch.from_numpy(n + 1)].any() and not sel[pad].any()
    assert (tgt[sel] >= TOK.n_special).all()
    # unselected positions keep their token, and the mask token appears only where selected
    orig = torch.zeros_like(tok)
    for r, s in enumerate(seqs):
        orig[r, 1 : s.size + 1] = torch.from_numpy(s.astype(np.int64))
    inner = ~sel & ~pad
    inner[:, 0] = False
    inner[rows, torch.from_numpy(n + 1)] = False
    assert torch.equal(tok[inner], orig[inner]) and not (tok[~sel] == MASK).any()
    assert torch.equal(tgt[sel], orig[sel])
    # at least one selected position per sequence
    per_seq = sel.sum(1).numpy()
    assert per_seq.min() >= 1
    expected = (n * p + (1 - p) ** n).sum()
    sd = math.sqrt((n * p * (1 - p)).sum())
    assert abs(per_seq.sum() - expected) < 5 * sd, (per_seq.sum(), expected, sd)
    # 80 / 10 / 10; "random" shows up unchanged when it draws the original residue (1 in 25)
    S = int(sel.sum())
    masked = int((tok[sel] == MASK).sum())
    changed = int(((tok[sel] != MASK) & (tok[sel] != tgt[sel])).sum())
    same = S - masked - changed
    k = len(TOK.residue_ids)
    for count, prob in ((masked, 0.8), (changed, 0.1 * (k - 1) / k), (same, 0.1 + 0.1 / k)):
        assert abs(count - S * prob) < 5 * math.sqrt(S * prob * (1 - prob)), (count, S, prob)
    # replacements are residues, uniform over the 24 others given the original: Pearson chi^2
    repl = (tok[sel] != MASK) & (tok[sel] != tgt[sel])
    values, origs = tok[sel][repl].numpy(), tgt[sel][repl].numpy()
    assert np.isin(values, TOK.residue_ids).all()
    observed = np.bincount(values, minlength=TOK.vocab_size)[TOK.residue_ids]
    expected_v = np.array([(origs != v).sum() / (k - 1) for v in TOK.residue_ids])
    chi2 = ((observed - expected_v) ** 2 / expected_v).sum()
    assert chi2 < 58.6  # chi^2 quantile 1 - 1e-4 with 24 degrees of freedom


def test_mask_short_sequences_always_select_one():
    s = TOK.encode("MK")
    for seed in range(300):
        out, tgt = mask_tokens(np.concatenate([[BOS], s, [EOS]]), np.random.default_rng(seed))
        assert 1 <= (tgt != IGNORE_INDEX).sum() <= 2 and tgt[0] == tgt[-1] == IGNORE_INDEX
    out, tgt = mask_tokens(np.array([BOS, EOS]), np.random.default_rng(0))  # nothing to select
    assert (tgt == IGNORE_INDEX).all() and out.tolist() == [BOS, EOS]


def test_deterministic_and_independent_of_batching(seqs):
    col = Collator("bid", max_length=300, train=True, seed=5)
    a = col(seqs[:6], list(range(6)), epoch=1)
    b = col(seqs[:6], list(range(6)), epoch=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same item in another batch, at another position, gets the same crop and mask
    c = col([seqs[40], seqs[3]], [40, 3], epoch=1)
    L = int(a["lengths"][3])
    assert torch.equal(c["tokens"][1, :L], a["tokens"][3, :L]) and torch.equal(c["targets"][1, :L], a["targets"][3, :L])
    d = col(seqs[:6], list(range(6)), epoch=2)
    assert not torch.equal(a["targets"], d["targets"])  # a new epoch draws new masks
    e = Collator("bid", max_length=300, train=True, seed=6)(seqs[:6], list(range(6)), epoch=1)
    assert not torch.equal(a["targets"], e["targets"])


def test_packed_uni_and_bid_blocks(seqs):
    stream = np.concatenate([np.append(s, EOS) for s in seqs[:20]])
    blocks = [stream[:512], stream[512:1024], stream[1024:1300]]  # the last one short
    uni = Collator("uni", max_length=512, packed=True, train=True, pad_to_multiple_of=8)(blocks, [0, 1, 2])
    _check_contract(uni, 3)
    assert uni["tokens"].shape == (3, 512) and uni["lengths"].tolist() == [512, 512, 276]
    for r, x in enumerate(blocks):
        assert uni["tokens"][r, 0] == BOS and torch.equal(
            uni["tokens"][r, 1 : x.size], torch.from_numpy(x[:-1].astype(np.int64))
        )
        assert torch.equal(uni["targets"][r, : x.size], torch.from_numpy(x.astype(np.int64)))
    bid = Collator("bid", max_length=512, packed=True, train=True)(blocks, [0, 1, 2])
    sel = bid["targets"] != IGNORE_INDEX
    is_eos = torch.zeros_like(sel)
    for r, x in enumerate(blocks):
        is_eos[r, : x.size] = torch.from_numpy(x == EOS)
    assert not (sel & is_eos).any() and (bid["tokens"][is_eos] == EOS).all()
    assert sel.sum(1).min() >= 1
