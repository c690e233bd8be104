"""Contact maps, precision, APC and the cross-validated predictor on real structures.

Maps for the pipeline tests are built with numpy from the true C-beta distances (a positive
control: one head attends to spatial neighbours) and from noise (a negative control), written
through ``write_maps`` exactly as the export writes them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from Bio.PDB import PDBParser

from protein_performer.analysis.contacts import (
    K_FRACS,
    RANGES,
    apc,
    contact_map,
    folds_for,
    load_proteins,
    precision_at_k,
    run_contacts,
    symmetrize,
)
from protein_performer.analysis.maps import write_maps
from protein_performer.analysis.structures import (
    Chain,
    align_to_sequence,
    coords_on_sequence,
    load_structures,
    read_chains,
)

N_KORTEMME = 12


@pytest.fixture(scope="module")
def kortemme(shared_data) -> Path:
    return shared_data / "structures" / "kortemme40"


def _bio_cb(path: Path, chain: str = "A") -> np.ndarray:
    """C-beta (C-alpha for Gly) of every standard residue with a C-alpha, straight from Bio.PDB."""
    res = PDBParser(QUIET=True).get_structure("x", str(path))[0][chain]
    return np.array(
        [(r["CA"] if r.get_resname() == "GLY" else r["CB"]).coord for r in res if r.id[0] == " " and "CA" in r],
        dtype=np.float64,
    )


def _dist(xyz: np.ndarray) -> np.ndarray:
    return np.sqrt(((xyz[:, None] - xyz[None]) ** 2).sum(-1))


# ------------------------------------------------------------------------------ equations
def test_contact_count_of_a_real_chain(kortemme):
    path = kortemme / "PF00013_1WVN_A.pdb"
    xyz = _bio_cb(path)
    L = len(xyz)
    count = sum(1 for i in range(L) for j in range(i + 6, L) if np.linalg.norm(xyz[i] - xyz[j]) < 8.0)
    chain = read_chains(path)[0]
    cm = contact_map(chain.cb)
    assert np.array_equal(cm, cm.T) and np.all(np.diag(cm) == 1)
    assert int(np.triu(cm, 6).sum()) == count == 119  # KH domain of 1WVN, |i-j| >= 6


def test_perfect_predictor_precision(kortemme):
    for name in ("PF00041_1TEN_A.pdb", "PF00072_1MVO_A.pdb", "PF01029_1TZV_A.pdb"):
        chain = read_chains(kortemme / name)[0]
        L = len(chain)
        d = _dist(chain.cb)
        true = contact_map(chain.cb)
        for lo, hi in RANGES.values():
            i, j = np.triu_indices(L, lo)
            m = np.ones(len(i), bool) if hi is None else (j - i) <= hi
            t = true[i[m], j[m]]
            n_true, n_valid = int(np.nansum(t)), int((~np.isnan(t)).sum())
            for frac in K_FRACS.values():
                n = min(int(np.floor(L * frac + 1e-9)), n_valid)
                assert precision_at_k(-d, true, lo, hi, frac) == pytest.approx(min(n_true, n) / n)
        assert precision_at_k(-d, true, 24, None, 0.2) == 1.0


def test_precision_hand_example_and_ties():
    L = 30
    true = np.zeros((L, L))
    for i, j in ((0, 24), (1, 25), (2, 26)):
        true[i, j] = true[j, i] = 1.0
    pred = np.zeros((L, L))
    pred[0, 24], pred[0, 25], pred[1, 25] = 10.0, 9.0, 8.0
    # top floor(30 / 10) = 3 long-range pairs: two of them contacts
    assert precision_at_k(pred, true, 24, None, 0.1) == pytest.approx(2 / 3)
    # P@L/5 = 6 pairs: 2 contacts in the top 3, then 3 taken among 18 tied pairs holding 1 contact
    assert precision_at_k(pred, true, 24, None, 0.2) == pytest.approx((2 + 3 * 1 / 18) / 6)
    # a constant predictor scores the contact density (3 of the 21 long-range pairs)
    assert precision_at_k(np.zeros((L, L)), true, 24, None, 1.0) == pytest.approx(3 / 21)
    # no valid pair in range -> NaN
    assert np.isnan(precision_at_k(pred, np.full((L, L), np.nan), 24, None, 1.0))


def test_unresolved_residues_are_excluded(kortemme):
    chain = read_chains(kortemme / "PF00041_1TEN_A.pdb")[0]  # residue 0 has no C-alpha
    true = contact_map(chain.cb)
    assert np.isnan(true[0]).all() and not np.isnan(true[1:, 1:]).any()
    rng = np.random.default_rng(1)
    pred = rng.random(true.shape)
    boosted = pred.copy()
    boosted[0, :] = boosted[:, 0] = 100.0  # the unresolved residue ranked first: must not count
    for lo, hi in RANGES.values():
        assert precision_at_k(boosted, true, lo, hi, 1.0) == precision_at_k(pred, true, lo, hi, 1.0)


def test_random_predictor_scores_contact_density(kortemme):
    chain = read_chains(kortemme / "PF00179_1Z2U_A.pdb")[0]  # 150 residues
    true = contact_map(chain.cb)
    L = len(chain)
    i, j = np.triu_indices(L, 24)
    t = true[i, j]
    density = float(np.nanmean(t))
    rng = np.random.default_rng(0)
    draws = [precision_at_k(rng.random((L, L)), true, 24, None, 1.0) for _ in range(300)]
    # one draw: hypergeometric mean = density, sd <= sqrt(p (1 - p) / L); the mean of 300: sd / sqrt(300)
    sd = np.sqrt(density * (1 - density) / L) / np.sqrt(len(draws))
    assert abs(np.mean(draws) - density) < 4 * sd
    assert precision_at_k(np.ones((L, L)), true, 24, None, 1.0) == pytest.approx(density)


def test_apc_and_symmetrize():
    rng = np.random.default_rng(0)
    u, v = rng.random(40) + 0.1, rng.random(40) + 0.1
    rank1 = np.outer(u, v)
    assert np.abs(apc(rank1)).max() < 1e-12 * rank1.max()
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    # rowsum (3, 7), colsum (4, 6), total 10: A - [[1.2, 1.8], [2.8, 4.2]]
    np.testing.assert_allclose(apc(a), [[-0.2, 0.2], [0.2, -0.2]])
    stack = rng.random((2, 3, 7, 7))
    s = symmetrize(stack)
    np.testing.assert_allclose(s, np.swapaxes(s, -1, -2))
    np.testing.assert_allclose(s[1, 2], stack[1, 2] + stack[1, 2].T)
    np.testing.assert_allclose(apc(stack)[1, 2], apc(stack[1, 2]), rtol=1e-6)
    # APC rows and columns sum to zero
    np.testing.assert_allclose(apc(stack).sum(-1), 0.0, atol=1e-12)


def test_folds_partition_proteins():
    folds = folds_for(12, n_folds=5, seed=3)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests) == list(range(12))
    for tr, te in folds:
        assert not set(tr) & set(te) and len(tr) + len(te) == 12
    ((tr, te),) = folds_for(30, train_size=20, seed=0)
    assert len(tr) == 20 and len(te) == 10 and not set(tr) & set(te)
    with pytest.raises(ValueError, match="at least 2 proteins"):
        folds_for(1)


# ------------------------------------------------------------------------------ pipeline
def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _control_maps(
    xyz: np.ndarray, rng: np.random.Generator, informative: bool, layers: int = 2, heads: int = 3
) -> np.ndarray:
    """(layers, heads, L, L) row-stochastic maps; with ``informative``, layer 0 head 0 attends to
    residues by C-beta distance (logits -d / 1.5 plus unit noise), every other head is noise."""
    L = len(xyz)
    d = np.nan_to_num(_dist(xyz), nan=50.0)
    logits = rng.normal(size=(layers, heads, L, L))
    if informative:
        logits[0, 0] -= d / 1.5
    return _softmax(logits)


def _write_controls(
    chains: list[Chain], out: Path, seed: int = 0, sequences: dict | None = None, extra: list | None = None
):
    """maps.h5 with the positive control and a random-init-like negative control."""
    rng = np.random.default_rng(seed)
    pos, neg = [], []
    for c in chains:
        seq = (sequences or {}).get(c.key, c.sequence)
        xyz = coords_on_sequence(c, align_to_sequence(c, seq))
        pos.append(dict(id=c.name, sequence=seq, source=c.key, attentions=_control_maps(xyz, rng, True)))
        neg.append(dict(id=c.name, sequence=seq, source=c.key, attentions=_control_maps(xyz, rng, False)))
    write_maps(out / "trained.h5", pos + (extra or []), model_config={"control": "distance"}, apc=True)
    write_maps(out / "random.h5", neg, model_config={"control": "noise"})
    return out / "trained.h5", out / "random.h5"


def test_cli_end_to_end_on_kortemme(tmp_path, kortemme, repo_root):
    files = sorted(kortemme.glob("*.pdb"))[: N_KORTEMME + 1]
    sdir = tmp_path / "structures"
    sdir.mkdir()
    for f in files:
        (sdir / f.name).symlink_to(f)
    (sdir / "junk.pdb").write_text("HEADER    nothing here\nEND\n")
    chains, failures = load_structures(sdir)
    assert len(chains) == N_KORTEMME + 1 and [Path(f.source).name for f in failures] == ["junk.pdb"]
    # the 13th chain's maps come with another protein's sequence: reported, not evaluated
    bad = chains[N_KORTEMME]
    L0 = len(chains[0])
    wrong = dict(id=bad.name, sequence=chains[0].sequence, source=bad.key, attentions=np.full((2, 3, L0, L0), 1.0 / L0))
    trained, random = _write_controls(chains[:N_KORTEMME], tmp_path, extra=[wrong])
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "protein_performer.contacts",
            f"maps={trained}",
            f"structures={sdir}",
            f"output_dir={out}",
            f"baseline_maps={random}",
            "n_folds=4",
            "n_plots=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained" in proc.stdout and "long P@L" in proc.stdout and "junk.pdb" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["n_proteins"] == N_KORTEMME
    reasons = [f["reason"] for f in report["failures"]]
    assert any("junk.pdb" in r for r in reasons)
    assert any(f"{bad.path} chain A" in r and "identity" in r for r in reasons)
    m = report["methods"]
    assert set(m) == {f"{k}{x}" for k in ("trained", "random_init") for x in ("", "_best_head", "_mean")}
    assert m["trained"]["mean"]["long"]["P@L"] > 0.6 and m["trained"]["mean"]["long"]["P@L/5"] > 0.85
    assert m["trained_best_head"]["mean"]["long"]["P@L/5"] > 0.85
    # noise: precision ~ contact density (12 proteins x ~100 pairs: sd of the mean ~0.01)
    for meth in ("random_init", "random_init_best_head", "random_init_mean"):
        for r in RANGES:
            assert abs(m[meth]["mean"][r]["P@L"] - report["contact_density"][r]) < 0.05, (meth, r)
    assert all(f["trained_best_head"] == {"layer": 0, "head": 0, "index": 0} for f in report["folds"])
    # every protein is predicted once, by a fold that did not train on it
    tested = [n for f in report["folds"] for n in f["test"]]
    assert sorted(tested) == sorted(p["name"] for p in report["proteins"])
    for f in report["folds"]:
        assert not set(f["train"]) & set(f["test"])
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 6 * (N_KORTEMME + 1) * 3 * 3
    mean_row = next(
        r
        for r in rows
        if r["method"] == "trained" and r["protein"] == "MEAN" and r["range"] == "long" and r["k"] == "P@L"
    )
    assert float(mean_row["precision"]) == pytest.approx(m["trained"]["mean"]["long"]["P@L"], abs=1e-4)
    assert (out / "precision_by_range.png").stat().st_size > 10_000
    assert len(list((out / "contact_maps").glob("*.png"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["structures", "trained.h5", "random.h5", "report"]
    )  # Hydra left no litter


def test_multichain_mmcif_with_chain_breaks(tmp_path, repo_root):
    sdir = repo_root / "data" / "structures" / "biopython"
    chains, failures = load_structures(sdir)
    assert failures == [] and len(chains) == 9
    # 2XHE chain B: the maps' sequence holds the 23 + 17 unresolved residues too
    b = next(c for c in chains if c.key == "2XHE.pdb:B")
    rng = np.random.default_rng(5)
    full, breaks = [], dict(b.chain_breaks())
    for k, aa in enumerate(b.sequence):
        full.append(aa + "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), breaks.get(k, 0))))
    sequences = {b.key: "".join(full)}
    trained, _ = _write_controls(chains, tmp_path, seed=1, sequences=sequences)
    proteins, fails = load_proteins(trained, chains)
    assert fails == [] and len(proteins) == 9
    pb = next(p for p in proteins if p.source == "2XHE.pdb:B")
    assert pb.L == len(b) + 40 and np.isnan(np.diag(pb.true)).sum() == 40
    # restricting to chains by name, key or file
    sub, fails = load_proteins(trained, chains, wanted=["2XHE.pdb", "1A7G_E", "9XYZ_A"])
    assert sorted(p.source for p in sub) == ["1A7G.cif:E", "2XHE.pdb:A", "2XHE.pdb:B"]
    assert [f.reason for f in fails] == ["chains: '9XYZ_A' names no chain of the structures read"]
    report = run_contacts(trained, sdir, tmp_path / "out", n_folds=3, n_plots=1)
    assert report["n_proteins"] == 9 and "random_init" not in report["methods"]
    assert report["methods"]["trained"]["mean"]["long"]["P@L/5"] > 0.8
    assert report["proteins"][[p["name"] for p in report["proteins"]].index("2XHE_B")]["alignment"][
        "n_identical"
    ] == len(b)
