"""Tiled attention analysis (analysis/maps/tiles.py) against the dense maps of PerformerLM.attention_maps
and maps.ops: maps, row / column sums, S, APC, head means, top pairs and contact logits, for FAVOR+
softmax, FAVOR+ ReLU and exact attention, causal and bidirectional, tiles that do and don't divide L.

Tolerances: float32 throughout; every tiled quantity is the dense one up to a different order of
float32 sums over <= T terms of values <= 1 (relative error ~ T * 2^-24 ~ 1e-5 at T ~ 100)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protein_performer.analysis.maps import tiles
from protein_performer.analysis.maps.ops import apc_maps, symmetrize
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.layer_features import attention_features
from protein_performer.model.performer import PerformerConfig, PerformerLM

RTOL, ATOL = 1e-5, 1e-6
L = 70  # residues


def _model(attention: str, causal: bool, positions: str = "learned", **favor_kwargs) -> PerformerLM:
    torch.manual_seed(0)
    return PerformerLM(PerformerConfig(
        max_len=128, dim=32, depth=2, heads=3, dim_head=8, ff_dim=48, dropout=0.0, attention=attention,
        causal=causal, nb_features=16, positions=positions, favor_kwargs=favor_kwargs,
    )).eval()  # fmt: skip


def _tokens(causal: bool, length: int = L, seed: int = 1):
    residues = np.random.default_rng(seed).integers(4, 24, size=length)
    ids, keep = Tokenizer().frame(residues, causal)
    return torch.as_tensor(ids)[None], keep


def _layers(model: PerformerLM, causal: bool):
    """[(dense maps (h, L, L) float32 numpy, LayerFeatures)] per layer."""
    tokens, keep = _tokens(causal)
    dense = [m[0][:, keep, keep].numpy() for _, m in model.attention_maps(tokens)]
    res = slice(1, 1 + L)
    feats = [
        tiles.LayerFeatures(
            f["kind"], f["causal"], f["q"][0], f["k"][0], res,
            None if f["key_scale"] is None else f["key_scale"][0], f["floor"], f["scale"],
        )
        for _, f in attention_features(model, tokens)
    ]  # fmt: skip
    return list(zip(dense, feats))


CASES = [(a, c) for a in ("favor_softmax", "favor_relu", "exact") for c in (False, True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{'uni' if c else 'bid'}" for a, c in CASES])
def layers(request):
    attention, causal = request.param
    return _layers(_model(attention, causal), causal)


def _stack(fn, length: int, tile: int) -> np.ndarray:
    return np.concatenate([fn(i0, i1).numpy() for i0, i1 in tiles.tile_ranges(length, tile)], axis=-2)


@pytest.mark.parametrize("tile", [16, 7, 70, 100])
def test_maps_sums_sym_apc_equal_the_dense_ones(layers, tile):
    for dense, feats in layers:
        lt = tiles.LayerTiles(feats, tile=tile)
        np.testing.assert_allclose(_stack(lt.map_rows, L, tile), dense, rtol=RTOL, atol=ATOL)
        cols = np.concatenate([lt.map_cols(j0, j1).numpy() for j0, j1 in tiles.tile_ranges(L, tile)], axis=-1)
        np.testing.assert_allclose(cols, dense, rtol=RTOL, atol=ATOL)
        d64 = dense.astype(np.float64)
        np.testing.assert_allclose(lt.row_sums.numpy(), d64.sum(-1), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(lt.col_sums.numpy(), d64.sum(-2), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(_stack(lt.sym_rows, L, tile), symmetrize(dense), rtol=RTOL, atol=ATOL)
        apc = apc_maps(dense)
        np.testing.assert_allclose(_stack(lt.apc_rows, L, tile), apc, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(_stack(lt.apc_mean_rows, L, tile), apc.mean(0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("tile", [16, 7, 70])
def test_upper_tiles_are_the_rows_from_the_diagonal_tile_on(layers, tile):
    """apc_upper / sym_upper (the pairs i <= j, computed from A^T and the diagonal block when causal)
    are the dense APC(S) / S rows i0..i1 from column i0 on."""
    for dense, feats in layers:
        lt = tiles.LayerTiles(feats, tile=tile)
        sym, apc = symmetrize(dense), apc_maps(dense)
        for i0, i1 in tiles.tile_ranges(L, tile):
            got = lt.sym_upper(i0, i1)
            assert got.shape == (dense.shape[0], i1 - i0, L - i0)
            np.testing.assert_allclose(got.numpy(), sym[:, i0:i1, i0:], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(lt.apc_upper(i0, i1).numpy(), apc[:, i0:i1, i0:], rtol=RTOL, atol=ATOL)


def test_residue_maps_are_not_stochastic_but_sums_see_the_special_tokens(layers):
    """The normaliser runs over all tokens: the residue rows sum to less than 1 (so the test above
    checks the special tokens are in D), and the columns are not all equal."""
    for _, feats in layers:
        lt = tiles.LayerTiles(feats)
        assert float(lt.row_sums.max()) < 1.0 - 1e-4
        assert float(lt.col_sums.std()) > 1e-3


def test_head_selection_is_the_dense_maps_of_those_heads(layers):
    dense, feats = layers[-1]
    lt = tiles.LayerTiles(feats.select([2, 0]), tile=9)
    np.testing.assert_allclose(_stack(lt.apc_rows, L, 9), apc_maps(dense[[2, 0]]), rtol=RTOL, atol=ATOL)


def _dense_top(m: np.ndarray, k: int, min_sep: int):
    i, j = np.triu_indices(m.shape[0], k=min_sep)
    order = np.argsort(-m[i, j], kind="stable")[:k]
    return i[order], j[order], m[i, j][order]


@pytest.mark.parametrize("upper", [False, True], ids=["rows", "upper"])
@pytest.mark.parametrize("k,min_sep,tile", [(L, 6, 16), (5, 1, 7), (3000, 6, 33)])
def test_top_pairs_streamed_equal_the_dense_top_pairs(layers, k, min_sep, tile, upper):
    dense, feats = layers[0]
    target = apc_maps(dense).mean(0).astype(np.float64)
    lt = tiles.LayerTiles(feats, tile=tile)
    top = tiles.TopPairs(k, min_sep)
    for i0, i1 in tiles.tile_ranges(L, tile):
        if upper:  # the tile's columns start at i0
            top.add(i0, lt.apc_upper(i0, i1).mean(0), col0=i0)
        else:
            top.add(i0, lt.apc_mean_rows(i0, i1))
    i, j, v = top.result()
    di, dj, dv = _dense_top(target, k, min_sep)
    assert len(v) == len(dv) == min(k, (L - min_sep) * (L - min_sep + 1) // 2)
    np.testing.assert_allclose(v, dv, rtol=RTOL, atol=ATOL)
    assert np.all(j - i >= min_sep) and np.all(np.diff(v) <= 0)
    np.testing.assert_allclose(target[i, j], v, rtol=RTOL, atol=ATOL)  # every pair's value is its own
    gaps = np.abs(np.diff(dv))  # the pairs are the same where no two values are closer than rounding
    if len(dv) < len(np.triu_indices(L, k=min_sep)[0]) and gaps.min() > 1e-5:
        assert set(zip(i.tolist(), j.tolist())) == set(zip(di.tolist(), dj.tolist()))


def test_contact_logits_equal_the_weighted_sum_of_float16_apc_maps(layers):
    rng = np.random.default_rng(3)
    heads = layers[0][0].shape[0]
    w = rng.normal(size=(len(layers), heads))
    dense = np.stack([apc_maps(d).astype(np.float16) for d, _ in layers])  # (layers, heads, L, L)
    expect = np.tensordot(w.reshape(-1), dense.reshape(-1, L, L).astype(np.float32), axes=(0, 0)) + 0.25
    logits = tiles.ContactLogits(w, 0.25)
    lts = [tiles.LayerTiles(f, tile=13) for _, f in layers]
    got = np.concatenate([logits.tile(lts, i0, i1).numpy() for i0, i1 in tiles.tile_ranges(L, 13)])
    # float16 rounding of an APC value can flip by one ulp (2^-11 relative) between the two paths
    tol = 2.0**-10 * np.abs(dense).astype(np.float64).max() * np.abs(w).sum()
    np.testing.assert_allclose(got, expect, rtol=0, atol=tol)
    assert np.mean(np.abs(got - expect) < 1e-6) > 0.99  # the flips are rare: elsewhere float32 rounding
    for i0, i1 in tiles.tile_ranges(L, 13):  # one layer's term, the upper part of the rows
        part = logits.layer_part(1, lts[1], i0, i1, upper=True).numpy()
        want = np.tensordot(w[1], dense[1][:, i0:i1, i0:].astype(np.float32), axes=(0, 0))
        np.testing.assert_allclose(part, want, rtol=0, atol=tol)


def test_rotary_long_causal_softmax_scan_spans_many_chunks(monkeypatch):
    """Longer than several scan chunks, with the running stabilizer moving and a feature floor large
    enough to matter (eps 0.05): sums still equal."""
    monkeypatch.setattr(tiles, "SCAN_CHUNK", 17)
    model = _model("favor_softmax", True, positions="rotary", eps=0.05)
    (dense, feats), _ = _layers(model, True)
    lt = tiles.LayerTiles(feats, tile=32)
    np.testing.assert_allclose(lt.col_sums.numpy(), dense.astype(np.float64).sum(-2), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_stack(lt.apc_rows, L, 32), apc_maps(dense), rtol=RTOL, atol=ATOL)
    for i0, i1 in tiles.tile_ranges(L, 32):
        np.testing.assert_allclose(lt.apc_upper(i0, i1).numpy(), apc_maps(dense)[:, i0:i1, i0:], rtol=RTOL, atol=ATOL)


def test_bad_features_are_refused():
    q = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="kind"):
        tiles.LayerFeatures("flash", False, q, q, slice(1, 4))
    with pytest.raises(ValueError, match="contiguous"):
        tiles.LayerFeatures("favor", False, q, q, slice(3, 3))
    with pytest.raises(ValueError, match="tile"):
        list(tiles.tile_ranges(5, 0))


def test_top_pairs_of_a_batch_of_maps_are_each_maps_own(layers):
    dense, feats = layers[0]
    apc = apc_maps(dense)
    lt = tiles.LayerTiles(feats, tile=13)
    batch = tiles.TopPairs(20, 3, batch=apc.shape[0])
    singles = [tiles.TopPairs(20, 3) for _ in apc]
    for i0, i1 in tiles.tile_ranges(L, 13):
        rows = lt.apc_rows(i0, i1)
        batch.add(i0, rows)
        for t, r in zip(singles, rows):
            t.add(i0, r)
    for (bi, bj, bv), t, m in zip(batch.result(), singles, apc):
        si, sj, sv = t.result()
        np.testing.assert_array_equal(bv, sv)
        assert list(zip(bi, bj)) == list(zip(si, sj))
        np.testing.assert_allclose(bv, _dense_top(m.astype(np.float64), 20, 3)[2], rtol=RTOL, atol=ATOL)
