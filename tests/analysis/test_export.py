"""Attention export: the maps equal the paper's V = I construction (FAVOR+) and exact softmax
(Transformer), computed here independently; special tokens dropped; causal for UNI; APC and
embeddings; cropping; round trip through maps.h5; a checkpoint trained by the training code; the
command line (Hydra) leaves the working directory clean."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from trained import STRUCTURES, tiny_model, trained_checkpoint

from protein_performer.analysis.export import (
    InputReport,
    SequenceRecord,
    crop_window,
    export_attention,
    read_sequences,
    run_export,
    run_sequence,
)
from protein_performer.analysis.maps import MapsFile, sanitize_name
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.pretrained import load_model

REPO = Path(__file__).resolve().parents[2]
# float16 storage: relative rounding error <= 2^-11; below the normal range (6.1e-5) the spacing is
# 2^-24. float32 arithmetic along the way adds ~1e-6 (values <= 1).
F16_RTOL, ATOL = 2.0**-11, 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on shared CPU cores: one thread avoids OpenMP oversubscription (10-50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def real_sequences() -> list[SequenceRecord]:
    """Three real UniProt sequences (the first of 30-90 residues in the embedded sample)."""
    out = []
    for rec in read_sequences(REPO / "data" / "uniprot_sample.fasta.gz"):
        if 30 <= len(rec.sequence) <= 90:
            out.append(rec)
        if len(out) == 3:
            return out
    raise AssertionError("the sample holds fewer than 3 sequences of 30-90 residues")


def reference_maps(model: PerformerLM, sequence: str, how: str) -> list[np.ndarray]:
    """Per layer (heads, T, T) float64 maps over the full input (special tokens included), from
    the hidden states entering each layer, computed without ``attention_matrix``:
    ``how="identity"``: the FAVOR+ kernel's forward with V = I (one-hot positions, the paper);
    ``how="softmax"``: softmax(Q K^T / sqrt(d)) with the causal mask, in float64."""
    residues = Tokenizer().encode(sequence)
    tokens = torch.as_tensor(Tokenizer().frame(residues, model.config.causal)[0])[None]
    T = tokens.shape[1]
    out = []
    with torch.no_grad():
        x = model.embed(tokens)
        for block in model.blocks:
            q, k = block.attn.queries_keys(block.ln1(x))  # (1, h, T, d)
            if how == "identity":
                eye = torch.eye(T).expand(1, q.shape[1], T, T)
                a = block.attn.kernel(q, k, eye)[0].double().numpy()
            else:
                qd, kd = q[0].double().numpy(), k[0].double().numpy()
                s = np.einsum("hid,hjd->hij", qd, kd) / np.sqrt(q.shape[-1])
                if model.config.causal:
                    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
                s = s - s.max(-1, keepdims=True)
                a = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
            out.append(a)
            x = block(x)
    return out


def _close(stored: np.ndarray, ref: np.ndarray) -> None:
    stored = stored.astype(np.float64)
    err = np.abs(stored - ref)
    bound = F16_RTOL * np.abs(ref) + ATOL
    assert (err <= bound).all(), f"max excess {float((err - bound).max()):.3g}"


# ---------------------------------------------------------------------------------- the maps
@pytest.mark.parametrize("attention", ["favor_softmax", "favor_relu", "exact"])
@pytest.mark.parametrize("causal", [False, True], ids=["bid", "uni"])
def test_exported_maps_equal_the_reference_construction(attention, causal, real_sequences, tmp_path):
    model = tiny_model(attention, causal)
    reference = copy.deepcopy(model)  # the export must not change the model (no feature redraw)
    out = tmp_path / "maps.h5"
    summary = export_attention(model, real_sequences, out, progress=False)
    assert summary.records == 3 and summary.causal is causal
    how = "softmax" if attention == "exact" else "identity"
    with MapsFile(out) as mf:
        assert mf.attrs["causal"] is causal
        assert mf.attrs["model_config"]["attention"] == attention
        assert mf.ids == [r.id for r in real_sequences]
        for seq_rec in real_sequences:
            rec = mf.read(seq_rec.id)
            L = len(seq_rec.sequence)
            assert rec.sequence == seq_rec.sequence and rec.source == "uniprot_sample.fasta.gz"
            np.testing.assert_array_equal(rec.tokens, Tokenizer().encode(seq_rec.sequence))
            assert rec.attentions.dtype == np.float16 and rec.attentions.shape == (2, 4, L, L)
            for layer, full in enumerate(reference_maps(reference, seq_rec.sequence, how)):
                np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)  # the full maps are stochastic
                _close(rec.attentions[layer], full[:, 1 : L + 1, 1 : L + 1])  # bos (and eos) dropped
                # what is left of each row is 1 minus the mass on the special tokens
                special = full.sum(-1)[:, 1 : L + 1] - full[:, 1 : L + 1, 1 : L + 1].sum(-1)
                rows = rec.attentions[layer].astype(np.float64).sum(-1)
                np.testing.assert_allclose(rows, 1.0 - special, rtol=F16_RTOL, atol=L * ATOL)
            upper = np.triu(np.ones((L, L), bool), 1)
            if causal:
                assert (rec.attentions[..., upper] == 0).all()
            else:
                assert (rec.attentions[..., upper] > 0).mean() > 0.99


def test_bid_input_is_bos_residues_eos_and_uni_drops_eos():
    res = Tokenizer().encode("MKV")
    assert Tokenizer().frame(res, causal=False)[0].tolist() == [1, *res.tolist(), 2]
    assert Tokenizer().frame(res, causal=True)[0].tolist() == [1, *res.tolist()]


def test_maps_come_from_the_hidden_states_entering_each_layer_one_layer_at_a_time(real_sequences):
    """The maps handed out equal ``forward(return_attention=True)``; each layer's maps are handed
    out before the layer's block runs (so only one layer's maps need to be in memory)."""
    model = tiny_model("favor_softmax", False, depth=3)
    seq = real_sequences[0].sequence
    residues = Tokenizer().encode(seq)
    events = []
    next_block_ran = []

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: next_block_ran.append(i))

    got = {}

    def on_layer(layer, maps):
        events.append((layer, list(next_block_ran)))
        got[layer] = maps.clone()

    rep = run_sequence(model, residues, on_layer, want_repr=True)
    assert [e[0] for e in events] == [0, 1, 2]
    assert [e[1] for e in events] == [[], [0], [0, 1]]  # layer l's maps before block l starts
    tokens = torch.as_tensor(Tokenizer().frame(residues, False)[0])[None]
    with torch.no_grad():
        full = model(tokens, return_attention=True)
    L = len(seq)
    for layer in range(3):
        torch.testing.assert_close(got[layer], full["attentions"][layer][0, :, 1 : L + 1, 1 : L + 1])
    # the representation is the final LayerNorm's output: the LM head on it gives the logits
    torch.testing.assert_close(model.lm_head(rep), full["logits"][0, 1 : L + 1], rtol=1e-5, atol=1e-5)
    # maps only (PerformerLM.attention_maps): the same maps, and the last block never runs
    next_block_ran.clear()
    maps_only = {}
    run_sequence(model, residues, lambda layer, maps: maps_only.setdefault(layer, maps.clone()))
    assert next_block_ran == [0, 1] and all(torch.equal(maps_only[i], got[i]) for i in range(3))
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        run_sequence(model, residues, on_layer)


def test_apc_and_embeddings_round_trip(real_sequences, tmp_path):
    model = tiny_model("favor_relu", False)
    out = tmp_path / "maps.h5"
    export_attention(
        model,
        real_sequences,
        out,
        include=["attentions", "apc", "mean", "per_token"],
        progress=False,
        checkpoint_sha256="ab" * 32,
        metadata={"note": "unit"},
    )
    with MapsFile(out) as mf:
        assert mf.attrs["checkpoint_sha256"] == "ab" * 32
        for seq_rec in real_sequences:
            rec = mf.read(seq_rec.id)
            L = len(rec)
            a = rec.attentions.astype(np.float64)
            # APC of the symmetrized map, from the stored float16 maps (so the tolerance adds the
            # rounding of A): S = A + A^T, APC = S - rowsum(S) colsum(S) / sum(S)
            s = a + np.swapaxes(a, -1, -2)
            expected = s - s.sum(-1, keepdims=True) * s.sum(-2, keepdims=True) / s.sum((-1, -2), keepdims=True)
            assert rec.apc.dtype == np.float16 and rec.apc.shape == a.shape
            np.testing.assert_allclose(rec.apc, expected, rtol=0, atol=8 * 2.0**-11 * np.abs(s).max())
            residues = Tokenizer().encode(seq_rec.sequence)
            tokens = torch.as_tensor(Tokenizer().frame(residues, False)[0])[None]
            with torch.no_grad():
                logits = model(tokens)["logits"][0, 1 : L + 1].numpy()
            per_token = rec.embeddings["per_token"]
            assert per_token.shape == (L, 32) and per_token.dtype == np.float32
            np.testing.assert_allclose(
                per_token @ model.lm_head.weight.detach().numpy().T + model.lm_head.bias.detach().numpy(),
                logits,
                rtol=1e-5,
                atol=1e-5,
            )
            np.testing.assert_allclose(rec.embeddings["mean"], per_token.mean(0), rtol=1e-6, atol=1e-7)
    with h5py.File(out) as h5:
        export = json.loads(h5.attrs["export"])
        assert export["note"] == "unit" and export["records"] == 3 and export["include"][-1] == "per_token"
    # embeddings only: no maps stored
    export_attention(model, real_sequences[:1], out, include=["mean"], progress=False)
    with MapsFile(out) as mf:
        rec = mf.read(real_sequences[0].id)
        assert rec.attentions is None and rec.apc is None and set(rec.embeddings) == {"mean"}


def test_sequences_longer_than_max_len(real_sequences, tmp_path):
    model = tiny_model("favor_softmax", False, max_len=32)  # 30 residues + bos + eos
    seq = real_sequences[0]
    L = len(seq.sequence)
    assert L > 30
    with pytest.raises(ValueError, match=f"record {seq.id}: {L} residues .*crop=start"):
        export_attention(model, [seq], tmp_path / "err.h5", progress=False)
    assert not (tmp_path / "err.h5").exists() and not (tmp_path / "err.h5.partial").exists()
    with pytest.raises(ValueError, match="crop must be one of"):
        export_attention(model, [seq], tmp_path / "err.h5", crop="middle", progress=False)
    start = (L - 30) // 2
    assert crop_window(L, 30, "center", "x") == (start, start + 30)
    out = tmp_path / "center.h5"
    summary = export_attention(model, [seq, ("short", "MKVLAAGIV", "")], out, crop="center", progress=False)
    assert summary.cropped == 1 and summary.records == 2
    with h5py.File(out) as h5:
        g = h5[sanitize_name(seq.id)]
        assert g.attrs["crop_start"] == start and g.attrs["full_length"] == L
        assert g.attrs["sequence"] == seq.sequence[start : start + 30] and g["attentions"].shape == (2, 4, 30, 30)
        assert "crop_start" not in h5["short"].attrs
    # the cropped record's maps are exactly those of the cropped sequence
    other = tmp_path / "window.h5"
    export_attention(model, [(seq.id, seq.sequence[start : start + 30], "")], other, progress=False)
    with MapsFile(out) as a, MapsFile(other) as b:
        np.testing.assert_array_equal(a.read(seq.id).attentions, b.read(seq.id).attentions)
    summary = export_attention(
        model, [seq, ("short", "MKVLAAGIV", "")], tmp_path / "skip.h5", crop="skip", progress=False
    )
    assert summary.skipped == [seq.id] and summary.records == 1
    with MapsFile(tmp_path / "skip.h5") as mf:
        assert mf.ids == ["short"]
    export_attention(model, [seq], tmp_path / "start.h5", crop="start", progress=False)
    with MapsFile(tmp_path / "start.h5") as mf:
        assert mf.read(seq.id).sequence == seq.sequence[:30]
    uni = tiny_model("favor_softmax", True, max_len=32)  # UNI: 31 residues + bos
    with MapsFile(Path(export_attention(uni, [seq], tmp_path / "uni.h5", crop="start", progress=False).output)) as mf:
        assert len(mf.read(seq.id)) == 31


def test_fasta_input_errors_name_the_record(tmp_path):
    fasta = tmp_path / "bad.fasta.gz"
    with gzip.open(fasta, "wt") as fh:
        fh.write(">ok1 first\nMKVLAAG\nIVK\n>bad2 has J\nMKJV\n>empty3\n>ok4\nmkv*\n")
    with pytest.raises(ValueError, match=r"bad\.fasta\.gz:4 record bad2: invalid residue 'J'"):
        list(read_sequences(fasta))
    report = InputReport()
    recs = list(read_sequences(fasta, invalid="skip", report=report))
    assert [(r.id, r.sequence) for r in recs] == [("ok1", "MKVLAAGIVK"), ("ok4", "MKV")]
    assert [f["source"] for f in report.failures] == ["bad.fasta.gz:4", "bad.fasta.gz:6"]
    assert "empty sequence" in report.failures[1]["reason"]


def test_structure_folder_input_keys_match_the_contacts_step():
    from protein_performer.analysis.structures import load_structures

    recs = list(read_sequences(STRUCTURES))
    chains, _ = load_structures(STRUCTURES)
    assert [(r.id, r.source, r.sequence) for r in recs] == [(c.name, c.key, c.sequence) for c in chains]
    assert ("2XHE_B", "2XHE.pdb:B") in [(r.id, r.source) for r in recs]  # multi-chain file: both chains
    one = list(read_sequences(STRUCTURES / "1A8O.pdb"))
    assert [(r.id, r.source) for r in one] == [("1A8O_A", "1A8O.pdb:A")]


# ---------------------------------------------------------------------------------- checkpoints
def test_load_trained_checkpoint_and_export_is_deterministic(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    loaded = load_model(checkpoint)
    assert loaded.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert loaded.config == ckpt["hyper_parameters"]["model"] and loaded.info["global_step"] == 3
    assert not loaded.model.training
    state = loaded.model.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(state[k.removeprefix("model.")], v), k  # weights and the redrawn features
    # the step-2 redraw changed the features: the checkpoint's, not the initial draw, are used
    fresh = PerformerLM(PerformerConfig(**loaded.config))
    assert not torch.equal(fresh.blocks[0].attn.kernel.projection, state["blocks.0.attn.kernel.projection"])
    seqs = list(read_sequences(STRUCTURES))[:3]
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    export_attention(loaded, seqs, a, progress=False)
    export_attention(loaded, seqs, b, progress=False)  # no redraw in between: the same maps
    with MapsFile(a) as fa, MapsFile(b) as fb:
        assert fa.attrs["checkpoint_sha256"] == loaded.sha256 and fa.attrs["model_config"] == loaded.config
        for rid in fa.ids:
            np.testing.assert_array_equal(fa.read(rid).attentions, fb.read(rid).attentions)
        # and they are the V = I maps of the trained model as the checkpoint holds it
        rec = fa.read(seqs[0].id)
        L = len(rec)
        for layer, full in enumerate(reference_maps(load_model(checkpoint).model, rec.sequence, "identity")):
            _close(rec.attentions[layer], full[:, 1 : L + 1, 1 : L + 1])


def test_random_init_baseline(checkpoint):
    rng_before = torch.get_rng_state()
    r1 = load_model("random", model_config=checkpoint, seed=3)
    r2 = load_model("random", model_config=checkpoint, seed=3)
    r3 = load_model("random", model_config=checkpoint, seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert r1.sha256 == "" and r1.checkpoint == "random" and r1.seed == 3
    assert r1.config == load_model(checkpoint).config
    model, tokenizer = load_model(checkpoint)  # as esm.pretrained: the model and its alphabet
    assert isinstance(model, PerformerLM) and not model.training
    assert tokenizer.vocab_size == model.config.vocab_size and tokenizer.decode(tokenizer.encode("MKV")) == "MKV"
    w = lambda m: m.model.blocks[0].attn.to_q.weight  # noqa: E731
    assert torch.equal(w(r1), w(r2)) and not torch.equal(w(r1), w(r3))
    with pytest.raises(ValueError, match="model_config"):
        load_model("random")
    with pytest.raises(ValueError, match=r"not PerformerLM arguments"):
        load_model("random", model_config={"depth": 1, "layers": 3})


def test_bad_checkpoints_are_named(tmp_path, checkpoint):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        load_model(junk)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_model(tmp_path / "missing.ckpt")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    del ckpt["hyper_parameters"]["model"]
    nocfg = tmp_path / "nocfg.ckpt"
    torch.save(ckpt, nocfg)
    with pytest.raises(ValueError, match=r"nocfg.ckpt: the checkpoint stores no model config"):
        load_model(nocfg)
    cfg = dict(load_model(checkpoint).config, depth=3)
    with pytest.raises(ValueError, match=r"nocfg.ckpt: weights do not fit"):
        load_model(nocfg, model_config=cfg)


def test_command_line_on_a_structure_folder(checkpoint, tmp_path):
    """``python -m protein_performer.export_attention`` on the embedded structures; Hydra writes
    nothing into the working directory; the contacts step finds every chain by its source key."""
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "out" / "maps.h5"
    cmd = [
        sys.executable,
        "-m",
        "protein_performer.export_attention",
        f"checkpoint={checkpoint}",
        f"input={STRUCTURES}",
        f"output={out}",
        "include=[attentions,apc,mean]",
        "max_sequences=4",
        "progress=false",
    ]
    res = subprocess.run(
        cmd,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 sequences" in res.stdout and "2 layers x 2 heads" in res.stdout
    assert list(work.iterdir()) == []
    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.structures import load_structures

    chains, _ = load_structures(STRUCTURES)
    proteins, failures = load_proteins(out, chains)
    assert len(proteins) == 4 and failures == []
    with MapsFile(out) as mf:
        assert all(r.embeddings["mean"].shape == (32,) for r in mf.iter(load=("embeddings",)))
        assert mf.attrs["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_run_export_reports_structure_failures(checkpoint, tmp_path):
    folder = tmp_path / "structs"
    folder.mkdir()
    (folder / "1A8O.pdb").write_bytes((STRUCTURES / "1A8O.pdb").read_bytes())
    (folder / "broken.pdb").write_text("this is not a PDB file\n")
    summary = run_export(str(checkpoint), str(folder), str(tmp_path / "m.h5"), progress=False)
    assert summary.records == 1
    assert any("broken.pdb" in f["source"] or "broken.pdb" in f["reason"] for f in summary.input_failures)
