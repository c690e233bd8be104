"""The contact head on tiles (analysis/contacts/tiles.py) and predict_contacts at any length: the
dense probabilities equal ``ContactHead.predict(contact_features(...))`` (today's path) to float
rounding, the streamed top pairs equal the dense map's top pairs, sequences above ``dense_max`` are
written as top pairs (HDF5 + CSV), and a rotary model reads a sequence longer than max_len whole."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch

from protein_performer.analysis.contacts.head import ContactHead
from protein_performer.analysis.contacts.predict import (
    ContactsFile,
    _write_extras,
    _write_prediction,
    contact_features,
    predict_contacts,
)
from protein_performer.analysis.contacts.tiles import (
    dense_probabilities,
    iter_layer_tiles,
    layer_tiles,
    top_probabilities,
)
from protein_performer.analysis.export import SequenceRecord
from protein_performer.analysis.maps import accumulate
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.performer import PerformerConfig, PerformerLM

SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"


def _model(attention="favor_relu", causal=False, positions="learned", max_len=80) -> PerformerLM:
    torch.manual_seed(0)
    return PerformerLM(PerformerConfig(
        max_len=max_len, dim=32, depth=2, heads=3, dim_head=8, ff_dim=48, dropout=0.0, attention=attention,
        causal=causal, nb_features=16, positions=positions,
    )).eval()  # fmt: skip


def _head(layers=2, heads=3, seed=0) -> ContactHead:
    rng = np.random.default_rng(seed)
    n = layers * heads
    return ContactHead(layers, heads, rng.normal(size=n) * 20, -1.0, rng.normal(size=n) * 1e-3, 1 + rng.random(n))


def _flip_bound(head: ContactHead, feats: np.ndarray) -> float:
    """|dp| when float16 roundings of the APC features flip by one ulp: sum_f |v_f| ulp16(x_f) / 4."""
    v, _ = head.affine()
    return float(np.abs(v).sum() * 2.0**-10 * np.abs(feats.astype(np.float64)).max() / 4) + 1e-6


@pytest.mark.parametrize("attention,causal", [("favor_relu", False), ("favor_softmax", True), ("exact", False)])
def test_dense_probabilities_equal_todays_head_predict(attention, causal):
    model, head = _model(attention, causal), _head()
    residues = Tokenizer().encode(SEQ)
    feats = contact_features(model, residues)
    want = head.predict(feats)
    got = dense_probabilities(head, layer_tiles(model, residues, tile=16), tile=16)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, got.T)
    assert np.all(np.diag(got) == 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=_flip_bound(head, feats))
    assert np.mean(np.abs(got - want) <= 1e-6) > 0.95  # elsewhere float32 rounding only


def test_streamed_top_pairs_equal_the_dense_maps_top_pairs():
    model, head = _model(), _head(seed=1)
    residues = Tokenizer().encode(SEQ)
    lts = layer_tiles(model, residues, tile=11)
    dense = dense_probabilities(head, lts)
    i, j, p = top_probabilities(head, lts, len(SEQ), 6, tile=11)
    iu, ju = np.triu_indices(len(SEQ), k=6)
    want = np.sort(dense[iu, ju])[::-1][: len(SEQ)]
    np.testing.assert_allclose(p, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dense[i, j], p, rtol=0, atol=1e-6)
    assert np.all(j - i >= 6) and len(p) == len(SEQ)


@pytest.mark.parametrize("attention,causal", [("favor_relu", False), ("favor_softmax", True), ("exact", True)])
def test_top_pairs_one_layer_at_a_time_with_the_logits_on_disk(monkeypatch, attention, causal):
    """The long-sequence path: layers consumed one by one (iter_layer_tiles), the logits summed in a
    spilled float32 TileSum: the same pairs and probabilities as the dense map, to float32 rounding."""
    monkeypatch.setattr(accumulate, "MAX_BYTES", 0)
    model, head = _model(attention, causal), _head(seed=3)
    residues = Tokenizer().encode(SEQ)
    dense = dense_probabilities(head, layer_tiles(model, residues, tile=11))
    i, j, p = top_probabilities(head, iter_layer_tiles(model, residues, tile=11), len(SEQ), 6, tile=11)
    iu, ju = np.triu_indices(len(SEQ), k=6)
    want = np.sort(dense[iu, ju])[::-1][: len(SEQ)]
    np.testing.assert_allclose(p, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dense[i, j], p, rtol=0, atol=1e-5)
    assert np.all(j - i >= 6) and len(p) == len(SEQ) and np.all(np.diff(p) <= 0)


def test_long_sequences_are_written_as_top_pairs(tmp_path):
    model, head = _model(), _head(seed=2)
    full = next(predict_contacts(model, head, [("p", SEQ)], check_checkpoint=False))
    short = next(predict_contacts(model, head, [("p", SEQ)], check_checkpoint=False, dense_max=10, top=0.5))
    assert short.contacts is None and len(short.pairs[0]) == int(len(SEQ) * 0.5)
    dense_top = full.top_pairs(int(len(SEQ) * 0.5), head.min_sep)
    got_top = short.top_pairs(int(len(SEQ) * 0.5), head.min_sep)
    np.testing.assert_allclose([x for *_, x in got_top], [x for *_, x in dense_top], rtol=0, atol=1e-6)
    if np.min(-np.diff([x for *_, x in dense_top])) > 1e-5:  # no ties within rounding: the same pairs
        assert [(a, b) for a, b, _ in got_top] == [(a, b) for a, b, _ in dense_top]
    out = tmp_path / "c.h5"
    with h5py.File(out, "w") as h5:
        _write_prediction(h5, SequenceRecord("p", SEQ), 0, short)
        h5.attrs["complete"] = True
    with ContactsFile(out) as cf:
        (back,) = list(cf)
        assert back.contacts is None
        np.testing.assert_array_equal(back.pairs[0], short.pairs[0])
        _write_extras(cf, str(tmp_path / "c.csv"), str(tmp_path / "png"), 0.5, head.min_sep)
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [(int(r["i"]), int(r["j"])) for r in rows] == [(a, b) for a, b, _ in got_top]
    assert (tmp_path / "png" / "p.png").stat().st_size > 0


def test_rotary_model_reads_a_sequence_longer_than_max_len_whole():
    model, head = _model(positions="rotary", max_len=32), _head(seed=3)
    pred = next(predict_contacts(model, head, [("p", SEQ)], check_checkpoint=False))
    assert pred.contacts.shape == (len(SEQ), len(SEQ)) and pred.start == 0
    learned = _model(max_len=32)
    with pytest.raises(ValueError, match="crop"):
        next(predict_contacts(learned, head, [("p", SEQ)], check_checkpoint=False))
