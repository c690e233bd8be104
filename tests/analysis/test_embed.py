"""Embedding-only export: batching by length does not change a sequence's embedding, the file
equals export_attention's mean embeddings, and a killed run resumes to the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import REPO
from trained import tiny_model, trained_checkpoint

from protein_performer.analysis.embed import (
    embed_batch,
    embed_sequences,
    length_batches,
    read_embeddings,
    run_embed,
)
from protein_performer.analysis.export import run_export
from protein_performer.analysis.maps import MapsFile
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import IncompleteOutputError, UserError
from protein_performer.pretrained import load_model


def sample_fasta(path, n: int, max_len: int = 500):
    """The first ``n`` sample records no longer than ``max_len``, written to ``path``."""
    from protein_performer.data.fasta import read_fasta

    out = []
    for rec in read_fasta(REPO / "data" / "swissprot_sample.fasta.gz"):
        if len(rec.sequence) <= max_len:
            out.append(f">{rec.header.decode().split()[0]}\n{rec.sequence.decode()}\n")
        if len(out) == n:
            break
    path.write_text("".join(out))
    return path


def test_length_batches_cover_everything_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=500)
    batches = length_batches(lengths, 2048)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 2048
    assert length_batches(np.array([5000, 3]), 1000)[-1].tolist() == [0]  # too long: alone


@pytest.mark.parametrize("attention,causal", [("favor_softmax", False), ("favor_relu", True), ("exact", False)])
def test_batched_embedding_equals_alone(attention, causal):
    model = tiny_model(attention, causal).eval()
    tok = Tokenizer()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 20, size=n).astype(np.uint8) for n in (7, 40, 23, 61)]
    seqs = [tok.encode(tok.decode(s)) for s in seqs]
    together = embed_batch(model, seqs)
    for s, row in zip(seqs, together):
        alone = embed_batch(model, [s])[0]
        # padded keys are removed from attention, so only the float32 summation order differs
        np.testing.assert_allclose(row, alone, rtol=0, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bid", "uni"])
def test_embedding_is_the_mean_representation_over_the_framed_residues(causal):
    """One sequence alone: the mean of ``PerformerLM.representations`` over ``Tokenizer.frame``'s
    residue positions (float32: the summation order over the positions may differ)."""
    import torch

    model = tiny_model("favor_relu", causal).eval()
    tok = Tokenizer()
    residues = tok.encode("MKTAYIAKQRQISFVKSHFSRQ")
    ids, where = tok.frame(residues, causal)
    with torch.no_grad():
        rep = model.representations(torch.as_tensor(ids)[None])[0, where]
    mean = (rep.double().sum(0) / len(residues)).numpy()
    np.testing.assert_allclose(embed_batch(model, [residues])[0], mean, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_embeddings_equal_export_mean(ckpt, tmp_path):
    fasta = sample_fasta(tmp_path / "s.fasta", 40)
    maps = tmp_path / "maps.h5"
    run_export(str(ckpt), str(fasta), str(maps), include=["mean"], progress=False)
    out = tmp_path / "emb.h5"
    s = run_embed(str(ckpt), str(fasta), str(out), batch_tokens=3000, chunk=16, progress=False)
    assert s.sequences == 40 and not (tmp_path / "emb.h5.partial").exists()
    emb = read_embeddings(out)
    with MapsFile(maps) as mf:
        ids = list(mf.ids)
        assert list(emb["ids"]) == ids
        seqs = []
        for k, rid in enumerate(ids):
            rec = mf.read(rid, load=("embeddings",))
            seqs.append(rec.sequence)
            assert emb["lengths"][k] == len(rec.sequence)
            # export runs each sequence alone; here it shares a padded batch: float32 order only
            np.testing.assert_allclose(emb["mean"][k], rec.embeddings["mean"], rtol=0, atol=2e-5)
    # the Python API gives the same rows
    api = list(embed_sequences(load_model(ckpt), list(zip(ids, seqs)), batch_tokens=3000))
    assert [a[0] for a in api] == ids
    np.testing.assert_allclose(np.stack([e for _, _, e in api]), emb["mean"], rtol=0, atol=2e-5)


def test_embed_refuses_partial_and_bad_output(ckpt, tmp_path):
    fasta = sample_fasta(tmp_path / "s.fasta", 5)
    with pytest.raises(UserError, match="is a directory"):
        run_embed(str(ckpt), str(fasta), str(tmp_path), progress=False)
    part = tmp_path / "e.h5.partial"
    with h5py.File(part, "w") as h5:
        h5.attrs["rows_done"] = 0
    with pytest.raises(UserError, match="resume=true"):
        run_embed(str(ckpt), str(fasta), str(tmp_path / "e.h5"), progress=False)
    with pytest.raises(IncompleteOutputError, match="incomplete"):
        read_embeddings(part)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "protein_performer.embed", *args, "progress=false", "num_threads=1"]


@pytest.mark.slow
def test_embed_sigkill_then_resume(ckpt, tmp_path):
    """A real SIGKILL at seeded moments after the output has started; resume=true gives the
    uninterrupted run's rows."""
    fasta = sample_fasta(tmp_path / "s.fasta", 600)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref.h5"
    opts = ["chunk=8", "batch_tokens=2000"]
    r = subprocess.run(
        _cli(f"checkpoint={ckpt}", f"input={fasta}", f"output={ref}", *opts),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    want = read_embeddings(ref)
    assert len(want["ids"]) == 600
    rng = np.random.default_rng(7)
    interrupted = 0
    full = ref.stat().st_size
    # kill at a seeded point of the progress (the partial file's size against the finished one's),
    # so the moment does not depend on how fast or loaded the machine is
    for n, frac in enumerate(rng.uniform(0.2, 0.8, size=3)):
        out = tmp_path / f"run{n}.h5"
        part = tmp_path / f"run{n}.h5.partial"
        args = _cli(f"checkpoint={ckpt}", f"input={fasta}", f"output={out}", *opts)
        p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < 120:
            if part.exists() and part.stat().st_size >= frac * full:
                break
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not out.exists():  # killed before the end: nothing that looks complete
            interrupted += 1
            with pytest.raises(UserError):
                read_embeddings(out)
            if part.exists():
                with pytest.raises(IncompleteOutputError):
                    read_embeddings(part)
            r = subprocess.run(args + ["resume=true"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
        got = read_embeddings(out)
        assert list(got["ids"]) == list(want["ids"])
        np.testing.assert_array_equal(got["lengths"], want["lengths"])
        # same batches, same threads: the same float32 operations
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=0, atol=1e-6)
    assert interrupted >= 2  # kills land mid-run (the file grows chunk by chunk over seconds)


def _interrupted_partial(monkeypatch, ckpt, fasta, out, after_chunks: int, **opts) -> None:
    """``out``'s partial file as a run stopped (KeyboardInterrupt) after ``after_chunks`` chunks left it."""
    import protein_performer.analysis.embed as embed_mod

    real, calls = embed_mod._embed_chunk, []

    def stop_after(*a, **k):
        calls.append(1)
        if len(calls) > after_chunks:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(embed_mod, "_embed_chunk", stop_after)
    with pytest.raises(KeyboardInterrupt):
        run_embed(str(ckpt), str(fasta), str(out), progress=False, **opts)
    monkeypatch.setattr(embed_mod, "_embed_chunk", real)


def _same_embeddings(got, want) -> None:
    assert list(got["ids"]) == list(want["ids"])
    np.testing.assert_array_equal(got["lengths"], want["lengths"])
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=0, atol=1e-6)


def test_embed_resume_commit_marks(ckpt, tmp_path, monkeypatch, caplog):
    """The resume point is the last committed chunk: skipped (crop=skip) records before it do not
    shift the rows; rows written after it (a kill inside the chunk's flush) are cut away; a mark
    counting more rows than the file holds (no consistent commit) starts the run again."""
    fasta = sample_fasta(tmp_path / "s.fasta", 40, max_len=1000)
    lengths = [len(s) for s in fasta.read_text().splitlines()[1::2]]
    skipped = sum(n > 598 for n in lengths[:16])  # max_len 600: 598 residues + bos + eos
    assert skipped >= 1, lengths  # the committed chunks hold records crop=skip leaves out
    opts = dict(chunk=8, batch_tokens=2000, crop="skip")
    ref = run_embed(str(ckpt), str(fasta), str(tmp_path / "ref.h5"), progress=False, **opts)
    want = read_embeddings(ref.output)
    assert len(want["ids"]) == len(lengths) - sum(n > 598 for n in lengths)

    # stopped after two chunks: 16 records consumed, 16 - skipped rows written
    out = tmp_path / "a.h5"
    _interrupted_partial(monkeypatch, ckpt, fasta, out, 2, **opts)
    with h5py.File(out.with_name("a.h5.partial"), "r") as h5:
        assert list(h5.attrs["progress"]) == [16, 16 - skipped]
        assert h5["ids"].shape == (16 - skipped,)
    got = run_embed(str(ckpt), str(fasta), str(out), progress=False, resume=True, **opts)
    assert got.new == len(want["ids"]) - (16 - skipped)
    _same_embeddings(read_embeddings(out), want)

    # rows appended past the mark (killed inside the next chunk's flush): cut back to the mark
    out = tmp_path / "b.h5"
    _interrupted_partial(monkeypatch, ckpt, fasta, out, 2, **opts)
    with h5py.File(out.with_name("b.h5.partial"), "a") as h5:
        n0 = h5["ids"].shape[0]
        for name, junk in (("ids", ""), ("lengths", 0), ("mean", np.nan)):
            h5[name].resize(n0 + 3, axis=0)
            h5[name][n0:] = junk
    run_embed(str(ckpt), str(fasta), str(out), progress=False, resume=True, **opts)
    _same_embeddings(read_embeddings(out), want)

    # a mark ahead of the rows on disk (the case a single flush of rows and mark could leave)
    out = tmp_path / "c.h5"
    _interrupted_partial(monkeypatch, ckpt, fasta, out, 2, **opts)
    with h5py.File(out.with_name("c.h5.partial"), "a") as h5:
        h5.attrs["progress"] = np.array([24, h5["ids"].shape[0] + 8], dtype=np.int64)
    with caplog.at_level("WARNING", logger="protein_performer.analysis.embed"):
        got = run_embed(str(ckpt), str(fasta), str(out), progress=False, resume=True, **opts)
    assert "starting again" in caplog.text
    assert got.new == len(want["ids"])
    _same_embeddings(read_embeddings(out), want)
