"""Export's tiled outputs (analysis/export/tiles.py): layer / head selection, apc_mean (per layer and
over all layers), contacts (top pairs of every APC map) and the dense maps, all equal to the dense
computation (PerformerLM.attention_maps + maps.ops) to float16 / float32 rounding; checksums and
the resume copy of records with the new datasets; the command line options."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from protein_performer.analysis.export import MapSelection, SequenceRecord, export_attention
from protein_performer.analysis.export import tiles as export_tiles
from protein_performer.analysis.maps import MapsFile, MapsWriter, apc_maps, record_checksum
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import UserError
from protein_performer.model.performer import PerformerConfig, PerformerLM

F16 = 2.0**-11  # float16's relative rounding
SEQS = [
    SequenceRecord("a", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK"),
    SequenceRecord("b", "ACDEFGHIKLMNPQRSTVWY" * 2),
]


def _model(attention="favor_softmax", causal=False) -> PerformerLM:
    torch.manual_seed(0)
    return PerformerLM(PerformerConfig(
        max_len=64, dim=32, depth=3, heads=4, dim_head=8, ff_dim=48, dropout=0.0, attention=attention,
        causal=causal, nb_features=16,
    )).eval()  # fmt: skip


def _dense(model: PerformerLM, seq: str) -> np.ndarray:
    """(layers, heads, L, L) float32: the maps export's values must equal."""
    ids, keep = Tokenizer().frame(Tokenizer().encode(seq), bool(model.config.causal))
    return np.stack([m[0][:, keep, keep].numpy() for _, m in model.attention_maps(torch.as_tensor(ids)[None])])


def _close16(got, want):
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=2 * F16 * np.abs(want).max() + 1e-6)


@pytest.mark.parametrize("attention,causal", [("favor_softmax", False), ("favor_relu", True), ("exact", True)])
def test_selected_layers_heads_apc_mean_and_contacts_equal_the_dense_ones(tmp_path, attention, causal):
    model = _model(attention, causal)
    out = tmp_path / "maps.h5"
    sel = {"layers": [2, 0], "heads": [1, 3], "top": 0.5, "min_sep": 4, "tile": 7}
    export_attention(
        model, SEQS, out, include=["attentions", "apc", "apc_mean", "contacts"], progress=False, selection=sel
    )
    with MapsFile(out) as mf, h5py.File(out) as h5:
        for s in SEQS:
            dense = _dense(model, s.sequence)[np.ix_([0, 2], [1, 3])]
            apc = apc_maps(dense)
            rec = mf.read(s.id)
            L = len(s.sequence)
            _close16(rec.attentions, dense)
            _close16(rec.apc, apc)
            _close16(rec.apc_mean, apc.mean(1))
            g = h5[rec.group]
            assert list(g.attrs["map_layers"]) == [0, 2] and list(g.attrs["map_heads"]) == [1, 3]
            assert g["apc_mean"].attrs["reduce"] == "layer" and g["apc_mean"].chunks == (1, 7, L)
            k = round(0.5 * L)
            pairs, values = rec.contacts["pairs"], rec.contacts["values"]
            assert pairs.shape == (2, 2, k, 2) and values.shape == (2, 2, k)
            for li in range(2):
                for hi in range(2):
                    i, j = pairs[li, hi].T
                    assert np.all(j - i >= 4) and np.all(np.diff(values[li, hi]) <= 0)
                    np.testing.assert_allclose(values[li, hi], apc[li, hi][i, j], rtol=1e-5, atol=1e-6)
                    iu, ju = np.triu_indices(L, k=4)
                    best = np.sort(apc[li, hi][iu, ju])[::-1][:k]
                    np.testing.assert_allclose(values[li, hi], best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention,causal", [("favor_softmax", False), ("favor_relu", True), ("exact", True)])
@pytest.mark.parametrize("sum_max_bytes", [256 << 20, 0], ids=["in-memory", "spilled"])
def test_reduce_all_is_the_mean_over_layers_and_heads(tmp_path, monkeypatch, sum_max_bytes, attention, causal):
    """Without dense maps the tiles are the upper part of the rows (the sum mirrored, on disk when
    above SUM_MAX_BYTES): the same mean map and the same top pairs as the dense maps."""
    monkeypatch.setattr(export_tiles, "SUM_MAX_BYTES", sum_max_bytes)
    model = _model(attention, causal)
    out = tmp_path / "maps.h5"
    sel = {"reduce": "all", "tile": 16, "min_sep": 3}
    export_attention(model, SEQS, out, include=["apc_mean", "contacts", "mean"], progress=False, selection=sel)
    with MapsFile(out) as mf:
        for s in SEQS:
            rec = mf.read(s.id)
            L = len(s.sequence)
            apc = apc_maps(_dense(model, s.sequence))
            assert rec.attentions is None and rec.apc is None and rec.apc_mean.shape == (1, L, L)
            _close16(rec.apc_mean[0], apc.mean((0, 1)))
            assert set(rec.embeddings) == {"mean"}
            iu, ju = np.triu_indices(L, k=3)
            for li in range(apc.shape[0]):
                for hi in range(apc.shape[1]):
                    i, j = rec.contacts["pairs"][li, hi].T
                    values = rec.contacts["values"][li, hi]
                    assert len(values) == L and np.all(j - i >= 3) and np.all(np.diff(values) <= 0)
                    np.testing.assert_allclose(values, apc[li, hi][i, j], rtol=1e-5, atol=1e-6)
                    best = np.sort(apc[li, hi][iu, ju])[::-1][:L]
                    np.testing.assert_allclose(values, best, rtol=1e-5, atol=1e-6)


def test_records_with_tiled_datasets_copy_byte_for_byte(tmp_path):
    """Resume copies kept records with the calls export wrote them with: same checksums, same data."""
    model = _model()
    out = tmp_path / "maps.h5"
    export_attention(model, SEQS, out, include=["apc", "apc_mean", "contacts"], progress=False, selection={"tile": 9})
    copy = tmp_path / "copy.h5"
    with h5py.File(out) as src, MapsWriter(copy) as w:
        written = {src[g].attrs["id"]: w.copy_record(src[g]).checksum for g in src}
    with h5py.File(out) as a, h5py.File(copy) as b:
        for g in a:
            assert written[a[g].attrs["id"]] == record_checksum(a[g]) == record_checksum(b[g])
            for name in ("apc", "apc_mean", "contacts/pairs", "contacts/values"):
                np.testing.assert_array_equal(a[g][name][()], b[g][name][()])
                assert a[g][name].chunks == b[g][name].chunks
            assert sorted(a[g]["apc_mean"].attrs) == sorted(b[g]["apc_mean"].attrs) == ["heads", "layers", "reduce"]


def test_bad_selections_are_refused_before_any_work(tmp_path):
    model = _model()
    for sel, match in [
        ({"layers": [3]}, "layers"),
        ({"heads": [-1]}, "heads"),
        ({"reduce": "head"}, "reduce"),
        ({"top": 0}, "top"),
        ({"rows": 3}, "unknown"),
    ]:
        with pytest.raises(UserError, match=match):
            export_attention(model, SEQS, tmp_path / "x.h5", include=["apc_mean"], progress=False, selection=sel)
        assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


def test_selection_k_counts_pairs():
    assert MapSelection(top=1.0, min_sep=6).k(40) == 40
    assert MapSelection(top=100.0, min_sep=6).k(10) == 10  # all pairs with j - i >= 6 among 10: 4 + 3 + 2 + 1
    assert MapSelection(min_sep=6).k(6) == 0


def test_command_line_selection(tmp_path):
    """``layers=`` / ``heads=`` (a list or one number), ``include=[apc_mean,contacts]``, ``reduce``, ``top``."""
    import subprocess
    import sys

    cfg = tmp_path / "model.yaml"
    cfg.write_text("max_len: 64\ndim: 32\ndepth: 3\nheads: 4\ndim_head: 8\nff_dim: 48\nnb_features: 16\n")
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{s.id}\n{s.sequence}\n" for s in SEQS))
    out = tmp_path / "maps.h5"
    cmd = [sys.executable, "-m", "protein_performer.export_attention", "checkpoint=random", f"model_config={cfg}"]
    cmd += [f"input={fasta}", f"output={out}", "include=[apc_mean,contacts]", "layers=[1,2]", "heads=2"]
    cmd += ["reduce=all", "top=0.25", "progress=false", "min_residues=1"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    with h5py.File(out) as h5:
        g = h5["a"]
        L = len(SEQS[0].sequence)
        assert g["apc_mean"].shape == (1, L, L) and g["contacts/pairs"].shape == (2, 1, round(0.25 * L), 2)
        assert list(g.attrs["map_layers"]) == [1, 2] and list(g.attrs["map_heads"]) == [2]
        assert '"selection"' in h5.attrs["export"]


def test_rotary_models_export_sequences_longer_than_max_len_whole(tmp_path):
    torch.manual_seed(0)
    model = PerformerLM(
        PerformerConfig(
            max_len=16, dim=32, depth=2, heads=2, dim_head=8, ff_dim=48, nb_features=16, positions="rotary", causal=True
        )
    ).eval()
    out = tmp_path / "maps.h5"
    export_attention(model, SEQS[:1], out, include=["apc_mean"], progress=False)
    with MapsFile(out) as mf:
        rec = mf.read("a")
        _close16(rec.apc_mean, apc_maps(_dense(model, SEQS[0].sequence)).mean(1))


def test_long_dense_maps_are_written_band_by_band_and_copied_alike(tmp_path, monkeypatch):
    """Above DENSE_LAYER_MAX_BYTES a layer's dense maps are chunked by tile rows and written as the
    tiles come: the same values, checksums that stream band by band, and a resume copy that matches."""
    monkeypatch.setattr(export_tiles, "DENSE_LAYER_MAX_BYTES", 0)
    model = _model("favor_softmax", True)
    out = tmp_path / "maps.h5"
    inc = ["attentions", "apc", "apc_mean", "contacts"]
    export_attention(model, SEQS, out, include=inc, progress=False, selection={"tile": 16})
    with MapsFile(out) as mf, h5py.File(out) as h5:
        for s in SEQS:
            rec, L = mf.read(s.id), len(s.sequence)
            assert h5[rec.group]["attentions"].chunks == (1, 4, 16, L) == h5[rec.group]["apc"].chunks
            dense = _dense(model, s.sequence)
            _close16(rec.attentions, dense)
            _close16(rec.apc, apc_maps(dense))
            _close16(rec.apc_mean, apc_maps(dense).mean(1))
    copy = tmp_path / "copy.h5"
    with h5py.File(out) as src, MapsWriter(copy) as w:
        written = {src[g].attrs["id"]: w.copy_record(src[g]).checksum for g in src}
    with h5py.File(out) as a, h5py.File(copy) as b:
        for g in a:
            assert written[a[g].attrs["id"]] == record_checksum(a[g]) == record_checksum(b[g])
            for name in ("attentions", "apc", "apc_mean"):
                np.testing.assert_array_equal(a[g][name][()], b[g][name][()])
                assert a[g][name].chunks == b[g][name].chunks
