"""The saved contact head and predict_contacts: the head reproduces the fitted regression, the
predictions for a sequence equal what the contacts step computes from the exported maps of the
same checkpoint, the CLI writes a complete file (and a CSV and PNGs) and refuses what it must."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO
from trained import STRUCTURES, trained_checkpoint

from protein_performer.analysis.contacts import fit_logistic, load_proteins
from protein_performer.analysis.contacts.head import (
    ContactHead,
    ContactHeadError,
    head_from_estimator,
    training_subset,
)
from protein_performer.analysis.contacts.predict import ContactsFile, predict_contacts, reference_sequence
from protein_performer.analysis.export import run_export
from protein_performer.analysis.structures import load_structures
from protein_performer.errors import IncompleteOutputError, UserError
from protein_performer.pretrained import load_model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The tiny trained checkpoint, its APC maps of the embedded structures, the proteins and a
    standardized L1 regression fitted on all of them, and the head made from it."""
    ckpt = trained_checkpoint(tmp_path_factory)
    out = tmp_path_factory.mktemp("predict")
    maps = out / "maps.h5"
    run_export(str(ckpt), str(STRUCTURES), str(maps), include=["apc"], progress=False)
    chains, _ = load_structures(STRUCTURES)
    proteins, _ = load_proteins(maps, chains)
    assert len(proteins) >= 5
    est = fit_logistic(proteins, "trained", C=0.15, seed=0, standardize=True)
    lm = load_model(ckpt)
    cfg = lm.model.config
    head = head_from_estimator(
        est,
        cfg.depth,
        cfg.heads,
        checkpoint=str(ckpt),
        checkpoint_sha256=lm.sha256,
        training_proteins=[p.name for p in proteins],
    )
    return {"ckpt": ckpt, "maps": maps, "proteins": proteins, "est": est, "head": head, "lm": lm, "out": out}


def float16_flip_bound(head: ContactHead, features: np.ndarray) -> np.ndarray:
    """Per-pair bound on |p - p'| when the float32 maps behind ``features`` (P, F) come out a few
    ulps different (another thread count or kernel) and some float16 roundings of the APC features
    flip by one float16 ulp: |dlogit| <= sum_f |v_f| ulp16(x_f) and |dp| <= |dlogit| / 4."""
    v, _ = head.affine()
    ulp = np.spacing(np.abs(features.astype(np.float16))).astype(np.float64)
    return (np.abs(v)[None, :] * ulp).sum(1) / 4 + 1e-6


def test_head_equals_the_fitted_regression(fitted):
    """head.predict on the full APC stack == sklearn's predict_proba on the pair features."""
    from protein_performer.analysis.maps import MapsFile

    head, est = fitted["head"], fitted["est"]
    assert np.count_nonzero(head.weights) > 0  # standardized: the L1 fit keeps some maps
    with MapsFile(fitted["maps"]) as mf:
        for p in fitted["proteins"]:
            rec = mf.read(mf.find(source=p.source), load=("apc",))
            probs = head.predict(rec.apc)
            expected = est.predict_proba(p.features["trained"])[:, 1]
            # float32 features, float64 weights in both; the folded standardization reorders a few
            # float64 operations: agreement to ~1e-12 in the logit, 1e-6 leaves room for float32 output
            np.testing.assert_allclose(probs[p.i, p.j], expected, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(probs, probs.T)
            assert np.all(np.diag(probs) == 0)


def test_head_file_round_trip_and_refusals(fitted, tmp_path):
    head = fitted["head"]
    path = head.save(tmp_path / "contact_head.json")
    again = ContactHead.load(tmp_path)  # the folder holding it works too
    for k in ("weights", "mean", "scale"):
        np.testing.assert_array_equal(getattr(again, k), getattr(head, k))
    assert (again.intercept, again.checkpoint_sha256, again.training_proteins) == (
        head.intercept,
        head.checkpoint_sha256,
        head.training_proteins,
    )
    assert not list(tmp_path.glob(".*partial"))  # atomic write left no temporary
    d = json.loads(path.read_text())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ContactHeadError, match="bad.json: not a contact head"):
        ContactHead.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({**d, "format": "something.else"}))
    with pytest.raises(ContactHeadError, match="other.json: not a contact head file"):
        ContactHead.load(tmp_path / "other.json")
    (tmp_path / "short.json").write_text(json.dumps({**d, "weights": d["weights"][:-1]}))
    with pytest.raises(ContactHeadError, match="short.json: incomplete contact head"):
        ContactHead.load(tmp_path / "short.json")
    with pytest.raises(ContactHeadError, match="another checkpoint"):
        head.check_model("0" * 64, head.n_layers, head.n_heads)
    with pytest.raises(ContactHeadError, match="3 layers x 2 heads"):
        head.check_model(head.checkpoint_sha256, 3, 2)


def test_training_subset_is_seeded():
    names = [f"p{i}" for i in range(40)]
    a, b = training_subset(names, 20, seed=0), training_subset(names, 20, seed=0)
    assert a == b and len(a) == 20 and a == sorted(a)
    assert training_subset(names, 20, seed=1) != a
    assert training_subset(names[:7], 20) == list(range(7))


def test_predict_contacts_equals_the_contacts_step(fitted):
    """Predicting from the sequence alone gives, at every pair the contacts step scores, the
    probabilities its regression gives on the exported maps (same float16 APC features)."""
    head, est = fitted["head"], fitted["est"]
    proteins = fitted["proteins"]
    preds = list(predict_contacts(fitted["lm"], head, [(p.name, p.sequence) for p in proteins]))
    assert [x.id for x in preds] == [p.name for p in proteins]
    for p, pred in zip(proteins, preds):
        assert pred.contacts.shape == (p.L, p.L) and pred.contacts.dtype == np.float32
        expected = est.predict_proba(p.features["trained"])[:, 1]
        # the same float16 features unless the model ran with another thread count than the export
        assert np.all(np.abs(pred.contacts[p.i, p.j] - expected) <= float16_flip_bound(head, p.features["trained"]))
        assert np.abs(pred.contacts[p.i, p.j] - expected).mean() < 1e-6
        top = pred.top_pairs()
        assert len(top) == min(p.L, len(p.i)) and all(j - i >= head.min_sep for i, j, _ in top)
        assert [t[2] for t in top] == sorted((t[2] for t in top), reverse=True)


def test_predict_contacts_refuses_another_checkpoint(fitted):
    other = ContactHead(**{**fitted["head"].__dict__, "checkpoint_sha256": "f" * 64})
    with pytest.raises(ContactHeadError, match="another checkpoint"):
        next(predict_contacts(fitted["lm"], other, ["MKTAYIAKQRQISFVKSHFSRQ"]))


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "protein_performer.predict_contacts", *args, "progress=false"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        **kw,
    )


@pytest.mark.slow
def test_predict_contacts_cli(fitted, tmp_path):
    head_path = fitted["head"].save(tmp_path / "head" / "contact_head.json")
    proteins = fitted["proteins"][:3]
    fasta = tmp_path / "mine.fasta"
    fasta.write_text("".join(f">{p.name} some protein\n{p.sequence}\n" for p in proteins))
    out = tmp_path / "contacts.h5"
    r = _cli(
        f"checkpoint={fitted['ckpt']}",
        f"head={head_path}",
        f"input={fasta}",
        f"output={out}",
        f"csv={tmp_path / 'top.csv'}",
        f"png_dir={tmp_path / 'png'}",
        "min_residues=1",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 contact maps" in r.stdout
    with h5py.File(out, "r") as h5:
        assert h5.attrs["complete"] and h5.attrs["checkpoint_sha256"] == fitted["lm"].sha256
        for p in proteins:
            g = h5[p.name]
            assert g.attrs["id"] == p.name and g.attrs["sequence"] == p.sequence
            assert g["contacts"].dtype == np.float16 and g["contacts"].shape == (p.L, p.L)
    with ContactsFile(out) as cf:
        assert cf.ids() == [p.name for p in proteins]
        for p, pred in zip(proteins, cf):
            expected = fitted["est"].predict_proba(p.features["trained"])[:, 1]
            # stored as float16: probabilities in [0, 1] are rounded by at most 2^-12 (+ feature flips)
            diff = np.abs(pred.contacts[p.i, p.j] - expected)
            assert np.all(diff <= 2.5e-4 + float16_flip_bound(fitted["head"], p.features["trained"]))
    rows = list(csv.DictReader(open(tmp_path / "top.csv")))
    assert len(rows) == sum(p.L for p in proteins)
    assert {r["id"] for r in rows} == {p.name for p in proteins}
    assert sorted(x.name for x in (tmp_path / "png").iterdir()) == sorted(f"{p.name}.png" for p in proteins)

    # a reader refuses a partial file; a partial file blocks a plain rerun; resume finishes it
    part = out.with_name(out.name + ".partial")
    out.rename(part)
    with h5py.File(part, "a") as h5:
        del h5.attrs["complete"]
        del h5[proteins[-1].name]
    with pytest.raises(IncompleteOutputError, match="incomplete"):
        ContactsFile(part)
    r = _cli(f"checkpoint={fitted['ckpt']}", f"head={head_path}", f"input={fasta}", f"output={out}", "min_residues=1")
    assert r.returncode == 1 and "resume=true" in r.stderr and "Traceback" not in r.stderr
    r = _cli(
        f"checkpoint={fitted['ckpt']}",
        f"head={head_path}",
        f"input={fasta}",
        f"output={out}",
        "min_residues=1",
        "resume=true",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not part.exists()
    with ContactsFile(out) as cf:
        assert cf.ids() == [p.name for p in proteins]

    # a head fitted on another checkpoint: one line, exit 1, nothing written
    other = ContactHead(**{**fitted["head"].__dict__, "checkpoint_sha256": "f" * 64}).save(tmp_path / "other.json")
    out2 = tmp_path / "other.h5"
    r = _cli(f"checkpoint={fitted['ckpt']}", f"head={other}", f"input={fasta}", f"output={out2}", "min_residues=1")
    assert r.returncode == 1 and "another checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 or r.stderr.strip().splitlines()[-1].startswith("error:")
    assert not out2.exists()


def test_contacts_step_saves_the_head(fitted, tmp_path):
    """`contacts` writes contact_head.json: the regression on `head_train_size` seeded proteins,
    tied to the maps' checkpoint; predict_contacts with it reproduces that regression."""
    from protein_performer.analysis.contacts import precision_table, run_contacts

    report = run_contacts(fitted["maps"], STRUCTURES, tmp_path / "c", n_plots=0, head_train_size=4, seed=3)
    head = ContactHead.load(tmp_path / "c" / "contact_head.json")
    proteins = fitted["proteins"]
    idx = training_subset([p.name for p in proteins], 4, seed=3)
    assert head.training_proteins == [proteins[i].name for i in idx] == report["contact_head"]["training_proteins"]
    assert head.checkpoint_sha256 == fitted["lm"].sha256 and head.checkpoint == str(fitted["ckpt"])
    est = fit_logistic([proteins[i] for i in idx], "trained", C=0.15, seed=3)
    np.testing.assert_allclose(head.weights, est[-1].coef_[0], rtol=0, atol=1e-12)
    preds = list(predict_contacts(fitted["lm"], head, [(p.name, p.sequence) for p in proteins]))
    for p, pred in zip(proteins, preds):
        diff = np.abs(pred.contacts[p.i, p.j] - est.predict_proba(p.features["trained"])[:, 1])
        assert np.all(diff <= float16_flip_bound(head, p.features["trained"]))
        table = precision_table(p.pred_matrix(pred.contacts[p.i, p.j].astype(np.float64)), p.true)
        assert 0.0 <= table["long"]["P@L"] <= 1.0
    # the report is still written last, after the head
    assert (tmp_path / "c" / "report.json").stat().st_mtime_ns >= (
        tmp_path / "c" / "contact_head.json"
    ).stat().st_mtime_ns


def test_predicted_precision_matches_the_contacts_report(fitted, tmp_path):
    """Issue 12's check at test size (benchmarks/predict_contacts_check.py runs it on a recipe model):
    `contacts` with one split (train_size = head_train_size, same seed) saves the head fitted on the
    report's training proteins; predict_contacts from the sequences alone, with that head, gives the
    report's long-range P@L on the test proteins (issue's tolerance 0.01; here equal up to float16
    feature flips, which can only swap near-ties)."""
    from protein_performer.analysis.contacts import precision_at_k, run_contacts

    report = run_contacts(
        fitted["maps"], STRUCTURES, tmp_path / "c", n_plots=0, train_size=5, head_train_size=5, seed=0
    )
    head = ContactHead.load(tmp_path / "c" / "contact_head.json")
    assert sorted(head.training_proteins) == sorted(report["folds"][0]["train"])
    test = {p.name: p for p in fitted["proteins"] if p.name in report["folds"][0]["test"]}
    assert len(test) == len(fitted["proteins"]) - 5 >= 3
    preds = {x.id: x for x in predict_contacts(fitted["lm"], head, [(n, p.sequence) for n, p in test.items()])}
    per = report["methods"]["trained"]["per_protein"]
    mine = {n: precision_at_k(preds[n].contacts, p.true, 24, None, 1.0) for n, p in test.items()}
    for n in test:
        assert abs(mine[n] - per[n]["long"]["P@L"]) <= 1 / test[n].L + 1e-12, n
    reported = report["methods"]["trained"]["mean"]["long"]["P@L"]
    assert abs(np.mean(list(mine.values())) - reported) <= 0.01


def _aligned_head(fitted, reference: str) -> ContactHead:
    return ContactHead(**{**fitted["head"].__dict__, "align_to": {"id": "ref", "sequence": reference}})


def test_align_to_maps_the_reference_frame_back(fitted):
    """With a reference, a sequence is predicted on its row of the alignment to the reference and
    the probabilities land on its own residues: an insertion's residues get 0, a deletion's reference
    columns are read as X, and the reference itself goes through unchanged."""
    ref = fitted["proteins"][0].sequence
    plain = fitted["head"]
    # the reference with 6 inserted residues after position 20 and positions 50..57 deleted
    seq = ref[:20] + "WWWWWW" + ref[20:50] + ref[58:]
    row = ref[:50] + "X" * 8 + ref[58:]  # the sequence on the reference's columns
    (p_row,) = predict_contacts(fitted["lm"], plain, [row])
    (pred,) = predict_contacts(fitted["lm"], plain, [("mine", seq)], align_to=ref)
    assert pred.contacts.shape == (len(seq), len(seq)) and pred.sequence == seq
    want_aligned = np.r_[0:20, 26 : 26 + 30, 56 : len(seq)]  # the residues that sit on reference columns
    np.testing.assert_array_equal(pred.aligned, want_aligned)
    cols = np.r_[0:50, 58 : len(ref)]  # their reference columns
    np.testing.assert_array_equal(pred.contacts[np.ix_(want_aligned, want_aligned)], p_row.contacts[np.ix_(cols, cols)])
    assert not pred.contacts[20:26].any() and not pred.contacts[:, 20:26].any()
    # the head's reference is the default; align_to=False turns it off; the reference is the identity
    head = _aligned_head(fitted, ref)
    (by_head,) = predict_contacts(fitted["lm"], head, [("mine", seq)])
    np.testing.assert_array_equal(by_head.contacts, pred.contacts)
    (off,) = predict_contacts(fitted["lm"], head, [("mine", seq)], align_to=False)
    assert off.aligned is None and not np.array_equal(off.contacts, pred.contacts)
    (same,) = predict_contacts(fitted["lm"], head, [ref])
    (raw,) = predict_contacts(fitted["lm"], plain, [ref])
    np.testing.assert_array_equal(same.contacts, raw.contacts)
    # a sequence longer than the model's positions is fine: only the reference must fit
    max_res = fitted["lm"].model.config.max_len - 2
    long_seq = "M" * (max_res + 40) + ref
    (long_pred,) = predict_contacts(fitted["lm"], head, [long_seq])
    assert long_pred.contacts.shape == (len(long_seq),) * 2 and len(long_pred.aligned) >= 0.9 * len(ref)
    with pytest.raises(UserError, match="align_to: the reference has"):
        next(predict_contacts(fitted["lm"], plain, [ref], align_to="A" * (max_res + 1)))
    # one reading of align_to: None / True (the head's), False (none), a sequence or a FASTA file
    assert reference_sequence(head) == reference_sequence(head, True) == ref == reference_sequence(plain, ref.lower())
    assert reference_sequence(plain) is None and reference_sequence(head, False) is None
    with pytest.raises(UserError, match="the contact head names no reference"):
        reference_sequence(plain, True)
    with pytest.raises(UserError, match="align_to: empty"):
        reference_sequence(head, " ")


def test_align_to_words_of_the_command_line():
    """The command line's align_to= (as Hydra reads it) -> the library's: null / true / false kept,
    the words none / false and an empty value are False (no reference), the rest a sequence or path."""
    from protein_performer.cli.predict_contacts import _align_to

    given = [None, True, False, "none", " None ", "FALSE", "", "MKTAYIAK", " ref.fasta "]
    assert [_align_to(v) for v in given] == [None, True, False, False, False, False, False, "MKTAYIAK", "ref.fasta"]


def test_align_to_head_file_and_cli(fitted, tmp_path):
    """The head's reference survives its JSON; the CLI writes the reference and each record's
    aligned residues, and a FASTA given as align_to is read."""
    ref = fitted["proteins"][0].sequence
    head_path = _aligned_head(fitted, ref).save(tmp_path / "contact_head.json")
    assert ContactHead.load(head_path).align_to == {"id": "ref", "sequence": ref}
    # version 2 with a reference (older readers refuse it rather than predict unaligned), 1 without
    assert json.loads(head_path.read_text())["version"] == 2
    assert json.loads(fitted["head"].save(tmp_path / "plain.json").read_text())["version"] == 1
    with pytest.raises(ContactHeadError, match="align_to needs"):
        ContactHead(**{**fitted["head"].__dict__, "align_to": {"id": "ref"}})
    fasta = tmp_path / "mine.fasta"
    fasta.write_text(f">mine\n{ref[:20]}WWWWWW{ref[20:]}\n>ref\n{ref}\n")
    out = tmp_path / "c.h5"
    r = _cli(f"checkpoint={fitted['ckpt']}", f"head={head_path}", f"input={fasta}", f"output={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    with h5py.File(out, "r") as h5:
        assert h5.attrs["align_to"] == ref
        np.testing.assert_array_equal(h5["mine"]["aligned"][()], np.r_[0:20, 26 : len(ref) + 6])
    with ContactsFile(out) as cf:
        preds = list(cf)
    assert len(preds[1].aligned) == len(ref)
    # align_to=false (YAML, as Hydra reads it) turns the head's reference off
    off = tmp_path / "off.h5"
    r = _cli(f"checkpoint={fitted['ckpt']}", f"head={head_path}", f"input={fasta}", f"output={off}", "align_to=false")
    assert r.returncode == 0, r.stderr[-2000:]
    with h5py.File(off, "r") as h5:
        assert h5.attrs["align_to"] == "" and "aligned" not in h5["mine"]
    ref_fasta = tmp_path / "ref.fasta"
    ref_fasta.write_text(f">ref\n{ref}\n")
    (by_file,) = predict_contacts(
        fitted["lm"], fitted["head"], [ref[:20] + "WWWWWW" + ref[20:]], align_to=str(ref_fasta)
    )
    np.testing.assert_allclose(by_file.contacts, preds[0].contacts, rtol=0, atol=1e-3)  # float16 in the file


def test_mean_head_ranks_by_the_mean_of_all_maps(fitted, tmp_path):
    """head_kind=mean: equal weights a / F and intercept b, so a pair's probability is
    sigmoid(a * mean_f x_f + b) (ranked as the report's unsupervised trained_mean), (a, b) fitted on
    the training chains, and predict_contacts gives the same numbers from the sequence."""
    from protein_performer.analysis.contacts.run import fit_contact_head, run_contacts
    from protein_performer.analysis.contacts.study import fit_mean_calibration, mean_of_heads

    proteins = fitted["proteins"]
    head = fit_contact_head(proteins, fitted["maps"], train_size=3, seed=0, kind="mean")
    n = head.n_layers * head.n_heads
    assert head.settings["kind"] == "mean" and np.allclose(head.weights, head.weights[0])
    train = [p for p in proteins if p.name in head.training_proteins]
    a, b = fit_mean_calibration(train, "trained")
    assert head.weights[0] == pytest.approx(a / n) and head.intercept == pytest.approx(b)
    p = proteins[0]
    x = mean_of_heads(p.features["trained"])
    (pred,) = predict_contacts(fitted["lm"], head, [(p.name, p.sequence)])
    np.testing.assert_allclose(pred.contacts[p.i, p.j], 1 / (1 + np.exp(-(a * x + b))), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="head_kind"):
        run_contacts(fitted["maps"], STRUCTURES, tmp_path / "c", head_kind="median")
    report = run_contacts(fitted["maps"], STRUCTURES, tmp_path / "c", n_plots=0, head_kind="mean", head_train_size=3)
    assert report["contact_head"]["kind"] == "mean"
    saved = ContactHead.load(tmp_path / "c" / "contact_head.json")
    assert saved.settings["kind"] == "mean" and np.allclose(saved.weights, saved.weights[0])
