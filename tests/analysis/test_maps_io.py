"""maps.h5: the layout, a lossless-up-to-float16 round trip, lazy reading, clear errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from protein_performer.analysis.contacts import apc, symmetrize
from protein_performer.analysis.maps import (
    FORMAT_VERSION,
    MapsFile,
    MapsWriter,
    read_maps,
    sanitize_name,
    write_maps,
)
from protein_performer.data.tokenizer import Tokenizer

# two real sequences: 1A8O chain A (HIV capsid C-terminal domain) and the 1LCD chain A headpiece
SEQS = {
    "sp|P12493|GAG_HIV1/278-347": "MDIRQGPKEPFRDYVDRFYKTLRAEQASQEVKNWMTETLLVQNANPDCKTILKALGPGATLEEMMTACQG",
    "1LCD_A": "MKPVTLYDVAEYAGVSYQTVSRVVNQASHVSAKTREKVEAAMAELNYIPNR",
}


def _maps(L, layers=2, heads=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((layers, heads, L, L))
    return a / a.sum(-1, keepdims=True)


def test_round_trip_layout_and_values(tmp_path):
    path = tmp_path / "maps.h5"
    cfg = {"dim": 64, "depth": 2, "heads": 3, "attention": "favor"}
    maps = {k: _maps(len(s), seed=n) for n, (k, s) in enumerate(SEQS.items())}
    with MapsWriter(path, model_config=cfg, checkpoint_sha256="ab" * 32, causal=True) as w:
        for n, (k, s) in enumerate(SEQS.items()):
            w.add(
                k,
                s,
                maps[k],
                source=f"file{n}.pdb:A",
                apc=True,
                mean=np.arange(8, dtype=np.float64),
                per_token=np.ones((len(s), 8)),
            )
    with h5py.File(path) as h5:  # the documented layout, read with plain h5py
        assert h5.attrs["format_version"] == FORMAT_VERSION and bool(h5.attrs["causal"]) is True
        g = h5["sp_P12493_GAG_HIV1_278-347"]
        assert g.attrs["id"] == "sp|P12493|GAG_HIV1/278-347"
        assert g["tokens"].dtype == np.uint8 and g["attentions"].dtype == np.float16
        assert g["attentions"].shape == (2, 3, 70, 70) and g["apc"].dtype == np.float16
        assert g["embeddings/mean"].dtype == np.float32 and g["embeddings/per_token"].shape == (70, 8)
    with MapsFile(path) as mf:
        assert mf.attrs == {"format_version": 1, "model_config": cfg, "checkpoint_sha256": "ab" * 32, "causal": True}
        assert mf.ids == list(SEQS) and len(mf) == 2
        tok = Tokenizer()
        for k, s in SEQS.items():
            rec = mf[k]
            assert rec.sequence == s and np.array_equal(rec.tokens, tok.encode(s))
            # float16 keeps 11 significant bits: relative error <= 2^-11
            np.testing.assert_allclose(rec.attentions, maps[k], rtol=2**-11, atol=1e-7)
            ref = apc(symmetrize(maps[k].astype(np.float32)))
            np.testing.assert_allclose(rec.apc, ref, rtol=2**-10, atol=2e-4)
            assert np.array_equal(rec.embeddings["mean"], np.arange(8, dtype=np.float32))
        assert mf.find(source="file1.pdb:A") == "1LCD_A" and mf.find(record_id="1LCD_A") == "1LCD_A"
        assert mf.find(source="nope") is None


def test_lazy_reading_subsets(tmp_path):
    path = tmp_path / "maps.h5"
    recs = [dict(id=k, sequence=s, attentions=_maps(len(s), layers=3, seed=1)) for k, s in SEQS.items()]
    assert write_maps(path, recs) == 2
    with MapsFile(path) as mf:
        rec = mf.read("1LCD_A", load=("attentions",), layers=[2])
        assert rec.attentions.shape == (1, 3, 51, 51) and rec.apc is None and rec.embeddings == {}
        np.testing.assert_allclose(rec.attentions[0], recs[1]["attentions"][2], rtol=2**-11, atol=1e-7)
        only_ids = next(mf.iter(load=()))
        assert only_ids.attentions is None and only_ids.id == list(SEQS)[0]
    assert [r.id for r in read_maps(path)] == list(SEQS)


def test_layer_by_layer_writing_equals_whole(tmp_path):
    seq = SEQS["1LCD_A"]
    maps = _maps(len(seq), layers=3, heads=2, seed=4)
    with MapsWriter(tmp_path / "a.h5") as w:
        w.add("x", seq, maps, apc=True)
    with MapsWriter(tmp_path / "b.h5") as w:
        w.add_layers("x", seq, iter(maps), n_layers=3, n_heads=2)
        with pytest.raises(ValueError, match="got 2 layers, expected 3"):
            w.add_layers("y", seq, iter(maps[:2]), n_layers=3, n_heads=2)
    with MapsFile(tmp_path / "a.h5") as a, MapsFile(tmp_path / "b.h5") as b:
        assert b.ids == ["x"]
        ra, rb = a["x"], b["x"]
        assert np.array_equal(ra.attentions, rb.attentions) and np.array_equal(ra.apc, rb.apc)


def test_layers_handed_over_one_at_a_time_and_no_half_written_record(tmp_path):
    """``begin_layers``: the callback-driven form of ``add_layers`` (what export uses), with the
    datasets picked, embeddings known only after the maps, group attributes; any error drops the
    record; ``set_attr`` adds a file attribute but leaves the layout's own alone."""
    seq = SEQS["1LCD_A"]
    L = len(seq)
    maps = _maps(L, layers=2, heads=3, seed=5)
    emb = np.random.default_rng(1).random((L, 4)).astype(np.float32)
    path = tmp_path / "m.h5"
    with MapsWriter(path) as w:
        with w.begin_layers("x", seq, 2, 3, attentions=False, attrs={"crop_start": 7}) as rec:
            for layer in maps:
                rec.write_layer(layer)
            rec.add_embeddings(mean=emb.mean(0), per_token=emb)
        assert rec.name == "x" and rec.layers_written == 2
        with pytest.raises(RuntimeError, match="model failed"):
            with w.begin_layers("y", seq, 2, 3) as rec:
                rec.write_layer(maps[0])
                raise RuntimeError("model failed")
        with pytest.raises(ValueError, match=r"layer 0 shape \(3, 5, 5\)"):
            with w.begin_layers("z", seq, 2, 3) as rec:
                rec.write_layer(maps[0, :, :5, :5])
        with pytest.raises(ValueError, match=r"per_token shape"):
            with w.begin_layers("e", seq, 2, 3, attentions=False, apc=False) as rec:
                rec.add_embeddings(per_token=emb[:5])
        with pytest.raises(ValueError, match="got 1 layers, expected 2"):
            with w.begin_layers("c", seq, 2, 3) as rec:
                rec.write_layer(maps[0])
        assert w.n_records == 1
        w.set_attr("export", '{"note": 1}')
        with pytest.raises(ValueError, match="format_version"):
            w.set_attr("format_version", 2)
    with MapsFile(path) as mf:
        assert mf.ids == ["x"] and mf.attrs["format_version"] == FORMAT_VERSION
        r = mf["x"]
        assert r.attentions is None and r.apc.shape == (2, 3, L, L)
        np.testing.assert_array_equal(r.apc, apc(symmetrize(maps.astype(np.float32))).astype(np.float16))
        np.testing.assert_array_equal(r.embeddings["per_token"], emb)
        np.testing.assert_array_equal(r.embeddings["mean"], emb.mean(0))
    with h5py.File(path) as h5:
        assert h5["x"].attrs["crop_start"] == 7 and h5.attrs["export"] == '{"note": 1}'


def test_names_are_sanitized_and_unique(tmp_path):
    assert sanitize_name("sp|P1/2 x") == "sp_P1_2_x" and sanitize_name(".hidden") == "_.hidden"
    path = tmp_path / "maps.h5"
    with MapsWriter(path) as w:
        assert w.add("a/b", "ACDEFGHIK") == "a_b"
        assert w.add("a|b", "ACDEFGHIK") == "a_b__2"
    with MapsFile(path) as mf:
        assert mf.ids == ["a/b", "a|b"]


def test_errors_name_the_problem(tmp_path):
    with MapsWriter(tmp_path / "m.h5") as w:
        with pytest.raises(ValueError, match=r"expected \(layers, heads, 9, 9\)"):
            w.add("x", "ACDEFGHIK", np.zeros((2, 2, 11, 11)))  # special tokens not dropped
        with pytest.raises(ValueError, match="apc=True needs the attentions"):
            w.add("y", "ACDEFGHIK", apc=True)
    bad = tmp_path / "not.h5"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=r"not\.h5: not an HDF5 maps file"):
        MapsFile(bad)
    with h5py.File(tmp_path / "v0.h5", "w") as h5:
        h5.attrs["format_version"] = 0
    with pytest.raises(ValueError, match=r"v0\.h5: format_version"):
        MapsFile(tmp_path / "v0.h5")
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        MapsFile(tmp_path / "absent.h5")
