"""Attention aggregated over amino-acid pairs vs BLOSUM62, on real sequences."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from protein_performer.analysis.aa_similarity import (
    STANDARD_AA,
    aa_attention_counts,
    aa_attention_matrix,
    blosum62,
    blosum_correlation,
    plot_aa_similarity,
)
from protein_performer.analysis.maps import MapsRecord, write_maps


@pytest.fixture(scope="module")
def sequences(shared_data) -> list[str]:
    """The 40 real kortemme40 chain sequences (50-150 residues)."""
    rows = csv.DictReader(open(shared_data / "structures" / "kortemme40" / "chains.tsv"), delimiter="\t")
    return [r["atom_sequence"] for r in rows]


def _idx(seq: str) -> np.ndarray:
    return np.array([STANDARD_AA.index(a) for a in seq])


def _blosum_maps(seq: str, temperature: float = 2.0) -> np.ndarray:
    """(1, 1, L, L): residue i attends to j in proportion to exp(BLOSUM62[x_i, x_j] / T)."""
    b = blosum62()
    idx = _idx(seq)
    logits = b[idx][:, idx] / temperature
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[None, None]


def _uniform_maps(seq: str) -> np.ndarray:
    L = len(seq)
    return np.full((1, 1, L, L), 1.0 / L)


def _records(seqs, make):
    return [
        MapsRecord(id=f"s{n}", sequence=s, tokens=np.zeros(len(s), np.uint8), attentions=make(s))
        for n, s in enumerate(seqs)
    ]


def test_counts_match_a_plain_loop():
    rng = np.random.default_rng(0)
    seq = "MKVLAAGCWXDDAKY"  # X: not one of the 20, left out with its row and column
    a = rng.random((2, 2, len(seq), len(seq)))
    obs, exp, n = aa_attention_counts(_records([seq], lambda s: a), max_sequences=None)
    assert n == 1 and obs.shape == (2, 2, 20, 20)
    keep = [k for k, c in enumerate(seq) if c in STANDARD_AA]
    sub = "".join(seq[k] for k in keep)
    L = len(sub)
    counts = np.bincount(_idx(sub), minlength=20)
    o_ref, e_ref = np.zeros((20, 20)), np.zeros((20, 20))
    for i in keep:
        ai = STANDARD_AA.index(seq[i])
        r_i = sum(a[1, 0, i, j] for j in keep if j != i)
        for j in keep:
            if j != i:
                o_ref[ai, STANDARD_AA.index(seq[j])] += a[1, 0, i, j]
        for b in range(20):
            e_ref[ai, b] += r_i * (counts[b] - (ai == b)) / (L - 1)
    np.testing.assert_allclose(obs[1, 0], o_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(exp[1, 0], e_ref, rtol=1e-5, atol=1e-7)
    # every unit of attention mass is expected somewhere: totals agree
    assert exp[1, 0].sum() == pytest.approx(obs[1, 0].sum(), rel=1e-5)


def test_blosum_affinity_attention_correlates(sequences):
    M = aa_attention_matrix(_records(sequences, _blosum_maps))
    np.testing.assert_allclose(M, M.T)
    c = blosum_correlation(M)
    assert c["n_pairs"] == 190
    assert c["pearson"] > 0.95 and c["spearman"] > 0.93, c  # S ~ B / (2 ln 2) - row terms
    # the same attention with the amino-acid labels shuffled carries no BLOSUM signal
    perm = np.random.default_rng(0).permutation(20)
    shuffled = blosum_correlation(M[perm][:, perm])
    assert abs(shuffled["pearson"]) < 0.3


def test_uniform_attention_normalizes_to_zero(sequences):
    M = aa_attention_matrix(_records(sequences, _uniform_maps))
    assert np.isfinite(M).all() and np.abs(M).max() < 1e-5
    c = blosum_correlation(M)
    assert np.isnan(c["pearson"]) and np.isnan(c["spearman"])


def test_max_sequences_and_plot(tmp_path, sequences):
    _, _, n = aa_attention_counts(_records(sequences, _uniform_maps), max_sequences=7)
    assert n == 7
    M = aa_attention_matrix(_records(sequences[:10], _blosum_maps))
    plot_aa_similarity(M, tmp_path / "aa.png")
    assert (tmp_path / "aa.png").stat().st_size > 10_000


def test_cli_reports_best_head(tmp_path, sequences, repo_root):
    def two_by_two(s):  # layer 1 head 0 follows BLOSUM62, the other heads are uniform
        maps = np.repeat(np.repeat(_uniform_maps(s), 2, 0), 2, 1)
        maps[1, 0] = _blosum_maps(s)[0, 0]
        return maps

    recs = [dict(id=f"k{n}", sequence=s, attentions=two_by_two(s)) for n, s in enumerate(sequences[:20])]
    write_maps(tmp_path / "maps.h5", recs, model_config={"control": "blosum"})
    out = tmp_path / "aa"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "protein_performer.aa_similarity",
            f"maps={tmp_path / 'maps.h5'}",
            f"output_dir={out}",
            "max_sequences=15",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(repo_root)),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "15 sequences" in proc.stdout and "best head: layer 1 head 0" in proc.stdout
    res = json.loads((out / "aa_similarity.json").read_text())
    assert res["n_sequences"] == 15 and res["best_head"]["layer"] == 1 and res["best_head"]["head"] == 0
    assert res["best_head"]["pearson"] > 0.8 and res["all_heads"]["pearson"] > 0.8
    assert [h["pearson"] for h in res["per_head"] if (h["layer"], h["head"]) != (1, 0)] == [None] * 3
    assert len(res["matrix"]) == 20 and (out / "aa_similarity.png").exists()
    # Hydra writes only its log next to the results (no .hydra/, no outputs/ in the cwd)
    assert sorted(p.name for p in out.iterdir()) == [
        "aa_similarity.csv",
        "aa_similarity.json",
        "aa_similarity.log",
        "aa_similarity.png",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aa", "maps.h5"]
