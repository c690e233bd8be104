"""The family-contacts tool on a user's own family (issue 21, item 1): input kinds, gap filtering and
weights into training rows, the weighted sampler, the one-line errors, and (slow) the command end to
end on a tiny A3M, a tiny Stockholm file and unaligned homologs with a structure as the query."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from protein_performer.cli.family_contacts import is_tool, main, parse
from protein_performer.recipes.family_contacts import msa
from protein_performer.recipes.family_contacts.data import WeightedBatchSampler
from protein_performer.recipes.family_contacts.tool import max_time, prepare, read_query
from protein_performer.resources import PACKAGE

AA = "ACDEFGHIKLMNPQRSTVWY"
STRUCTURE = PACKAGE / "sample_data" / "structures" / "biopython" / "1A8O.pdb"
# a tiny model and a few steps (tests/recipes/test_family_contacts.py's tiny recipe, one factored layer)
TINY = [
    "method=lm",
    "trainer.max_steps=6",
    "model.heads=4",
    "model.dim=32",
    "model.dim_head=8",
    "model.ff_dim=64",
    "data.batch_size=8",
    "module.warmup_steps=0",
]
POTTS_TINY = ["trainer.max_steps=60", "model.heads=8", "model.dim_head=8", "num_threads=1"]  # the default model


def family(L: int = 40, n: int = 50, seed: int = 0) -> tuple[str, list[str]]:
    """A query and ``n`` noisy copies of it (30% substituted, 8% gaps), aligned column for column."""
    rng = np.random.default_rng(seed)
    query = "".join(rng.choice(list(AA), L))
    rows = []
    for _ in range(n):
        row = list(query)
        for k in range(L):
            u = rng.random()
            row[k] = rng.choice(list(AA)) if u < 0.3 else "-" if u < 0.38 else row[k]
        rows.append("".join(row))
    return query, rows


def write_a3m(path, query: str, rows: list[str]) -> None:
    """An A3M file; every fifth row carries an insertion (lowercase) after column 10."""
    text = [">query", query]
    for n, row in enumerate(rows):
        text += [f">seq{n}", row[:10] + "kl" + row[10:] if n % 5 == 0 else row]
    path.write_text("\n".join(text) + "\n")


def write_stockholm(path, query: str, rows: list[str]) -> None:
    """A Stockholm file with one insert column (lowercase / '.') after column 5."""
    lines = ["# STOCKHOLM 1.0", f"query {query[:5]}.{query[5:]}"]
    lines += [f"seq{n} {row[:5]}{'a' if n % 3 == 0 else '.'}{row[5:]}" for n, row in enumerate(rows)]
    path.write_text("\n".join([*lines, "//"]) + "\n")


# ------------------------------------------------------------------------------ input and rows
def test_a3m_rows_are_over_the_query_positions_with_dca_weights(tmp_path):
    query, rows = family()
    rows[3] = "-" * 30 + rows[3][30:]  # 75% gaps: dropped
    rows = [r[:20] + "-" + r[21:] for r in rows]  # column 20 gapped in every row but the query: dropped
    write_a3m(tmp_path / "f.a3m", query, rows)
    p = prepare(tmp_path / "f.a3m")
    assert p.query == query and p.query_id == "query" and p.rows[0] == query[:20] + "X" + query[21:]
    assert "seq3" not in p.ids and len(p.rows) == len(rows) and all(len(r) == len(query) for r in p.rows)
    assert p.stats["n_columns_kept"] == len(query) - 1
    for rid, row in zip(p.ids[1:], p.rows[1:]):  # the insertion dropped, gaps as X, column 20 X
        original = rows[int(rid[3:])]
        expected = original.replace("-", "X")
        assert row == expected[:20] + "X" + expected[21:]
    kept = msa.filter_gaps(msa.read_alignment(tmp_path / "f.a3m"))
    np.testing.assert_allclose(p.weights, msa.sequence_weights(kept.tokens), rtol=0, atol=0)


def test_stockholm_aligned_fasta_and_homologs_are_told_apart(tmp_path):
    query, rows = family(L=30, n=20)
    write_stockholm(tmp_path / "f.sto", query, rows)
    sto = prepare(tmp_path / "f.sto")
    assert sto.query == query and sto.stats["format"] == "alignment" and sto.stats["n_columns"] == 30
    (tmp_path / "f.fasta").write_text("".join(f">r{n}\n{r}\n" for n, r in enumerate([query, *rows])))
    aligned = prepare(tmp_path / "f.fasta")
    assert aligned.stats["format"] == "alignment" and aligned.rows == sto.rows
    homologs = [r.replace("-", "") for r in rows]
    (tmp_path / "h.fasta").write_text("".join(f">h{n}\n{r}\n" for n, r in enumerate(homologs)))
    own = prepare(tmp_path / "h.fasta", query=query)  # the query is not among them: added first
    assert own.stats["format"] == "unaligned homologs" and own.ids[0] == "query" and own.rows[0] == query
    assert own.stats["n_sequences"] == len(rows) + 1 and all(len(r) == len(query) for r in own.rows)


def test_query_from_a_record_id_a_sequence_and_a_structure(tmp_path):
    query, rows = family(L=30, n=10)
    write_a3m(tmp_path / "f.a3m", query, rows)
    assert prepare(tmp_path / "f.a3m", query="seq1").query_id == "seq1"
    assert prepare(tmp_path / "f.a3m", query=query.lower()).query_id == "query"
    rid, seq = read_query(str(STRUCTURE))
    assert rid.startswith("1A8O") and len(seq) > 30 and set(seq) <= set(AA + "X")
    with pytest.raises(msa.AlignmentError, match="f.a3m: no record is the query"):
        prepare(tmp_path / "f.a3m", query="MKV" * 12)


def test_max_time_is_the_minutes():
    assert max_time(10) == "00:00:10:00" and max_time(0.5) == "00:00:00:30" and max_time(125) == "00:02:05:00"


def test_the_mode_follows_query_or_an_alignment_input():
    assert is_tool(parse(["input=f.a3m", "output_dir=o"])[0])
    assert is_tool(parse(["input=homologs.fasta", "query=MKV", "output_dir=o"])[0])
    assert is_tool(parse(["input=own.fasta", "output_dir=o"])[0])  # no family=: the user's own FASTA
    opts, overrides = parse(["family=PF00072", "output_dir=o", "input=pfam.fasta.gz", "model.dim=64"])
    assert not is_tool(opts) and overrides == ["model.dim=64"]


# ------------------------------------------------------------------------------ the weighted sampler
def test_weighted_sampler_draws_in_proportion_to_the_weights():
    weights = np.array([1.0, 1.0, 2.0, 4.0])
    sampler = WeightedBatchSampler(4, weights, batch_size=2, seed=3)
    counts = np.zeros(4)
    epochs = 2000
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for b in sampler.batches():
            counts += np.bincount(b, minlength=4)
    p = weights / weights.sum()
    draws = epochs * 4
    # each count is binomial(draws, p): 5 standard deviations
    assert np.all(np.abs(counts - draws * p) <= 5 * np.sqrt(draws * p * (1 - p)))
    # seeded by [seed, epoch], and the ranks deal out one order
    sampler.set_epoch(7)
    again = WeightedBatchSampler(4, weights, batch_size=2, seed=3)
    again.set_epoch(7)
    assert [b.tolist() for b in sampler.batches()] == [b.tolist() for b in again.batches()]
    ranks = [WeightedBatchSampler(4, weights, batch_size=1, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(7)
    order = np.concatenate(sampler.batches())
    assert sorted(np.concatenate([b for r in ranks for b in r.batches()]).tolist()) == sorted(order.tolist())


def test_datamodule_reads_every_training_sequences_weight(tmp_path):
    from protein_performer.data.ingest import ingest
    from protein_performer.recipes.family_contacts.data import FamilyDataModule

    query, rows = family(L=30, n=40)
    (tmp_path / "f.fasta").write_text("".join(f">s{n}\n{r.replace('-', 'X')}\n" for n, r in enumerate(rows)))
    (tmp_path / "w.tsv").write_text("id\tweight\n" + "".join(f"s{n}\t{n + 1}\n" for n in range(len(rows))))
    ingest(input=str(tmp_path / "f.fasta"), output_dir=str(tmp_path / "shards"), progress=False, workers=1)
    dm = FamilyDataModule(str(tmp_path / "shards"), batch_size=4, max_length=40, weights=str(tmp_path / "w.tsv"))
    dm.setup("fit")
    ds = dm.datasets["train"]
    expected = [int(ds.get_id(i)[1:]) + 1 for i in range(len(ds))]
    assert dm.item_weights("train").tolist() == expected
    assert isinstance(dm.sampler("train", train=True), WeightedBatchSampler)
    assert not isinstance(dm.sampler("train", train=False), WeightedBatchSampler)
    (tmp_path / "w.tsv").write_text("id\tweight\ns0\t1\n")
    with pytest.raises(ValueError, match="no weight for"):
        dm.item_weights("train")


# ------------------------------------------------------------------------------ bad alignments
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("ragged.a3m", ">q\nACDEFGHIKL\n>a\nACDEF\n", "ragged rows"),
        ("none.a3m", "# nothing\n", "no record, so no query"),
        ("gappy.a3m", ">q\nACDEFGHIKL\n>a\n--------KL\n>b\n---------L\n", "empty after filtering"),
        ("ragged.sto", "# STOCKHOLM 1.0\nq ACDEFGHIKL\na ACDEF\n//\n", "ragged rows"),
        ("homologs.fasta", ">q\nACDEFGHIKL\n>a\nACD*FGHIK\n", "record 'a': empty or not amino-acid letters"),
    ],
)
def test_a_bad_alignment_is_one_line_exit_1_and_nothing_written(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([f"input={tmp_path / name}", f"output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and message in err and name in err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [("trainer.max_epochs=3", "not one of its settings"), ("model.attention=linear", "attention must be one of")],
)
def test_attention_potts_refuses_settings_it_does_not_have(tmp_path, capsys, override, message):
    query, rows = family()
    write_a3m(tmp_path / "f.a3m", query, rows)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([f"input={tmp_path / 'f.a3m'}", f"output_dir={out}", override])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and message in err
    assert not out.exists()


# ------------------------------------------------------------------------------ end to end
def _check_outputs(out, query: str) -> np.ndarray:
    """The files exist; the CSV is the top-L of the HDF5 map (|i-j| >= 6, 1-based); returns the map."""
    for name in ("contacts.h5", "contacts.csv", "contacts.png", "contact_head.json", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    L = len(query)
    with h5py.File(out / "contacts.h5") as h5:
        contacts, pairs, probs = h5["contacts"][()], h5["top_pairs"][()], h5["top_probability"][()]
        assert h5.attrs["sequence"] == query
    assert contacts.shape == (L, L) and np.allclose(contacts, contacts.T) and not contacts.diagonal().any()
    i, j = np.triu_indices(L, k=6)
    kth = np.sort(contacts[i, j])[::-1][L - 1]
    with open(out / "contacts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(pairs) == L
    for row, (a, b), p in zip(rows, pairs, probs):
        assert (int(row["i"]), int(row["j"])) == (a, b) and b - a >= 6
        assert float(row["probability"]) == pytest.approx(contacts[a - 1, b - 1], abs=1e-6) == pytest.approx(p)
        assert contacts[a - 1, b - 1] >= kth  # among the L highest pairs of the map
    return contacts


def _predict_again(tmp_path, out, query: str) -> np.ndarray:
    """``python -m protein_performer.predict_contacts`` with the run's checkpoint and head on the query:
    the map it stores."""
    (tmp_path / "q.fasta").write_text(f">q\n{query}\n")
    args = [
        f"checkpoint={out / 'checkpoints' / 'last.ckpt'}",
        f"head={out / 'contact_head.json'}",
        f"input={tmp_path / 'q.fasta'}",
        f"output={tmp_path / 'predicted.h5'}",
        "progress=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "protein_performer.predict_contacts", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "predicted.h5") as h5:
        return h5["q"]["contacts"][()].astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, settings",
    [
        pytest.param(kind, settings, id=f"{kind}-{name}")
        for name, settings in (("attention_potts", POTTS_TINY), ("lm", TINY))
        for kind in ("a3m", "sto")
    ],
)
def test_tool_end_to_end_and_predict_contacts_gives_the_same_map(tmp_path, capsys, kind, settings):
    query, rows = family()
    path = tmp_path / f"family.{kind}"
    (write_a3m if kind == "a3m" else write_stockholm)(path, query, rows)
    out = tmp_path / "out"
    TINY = settings  # noqa: N806 - the run's settings, the name the reruns below use
    main([f"input={path}", f"output_dir={out}", "minutes=1", *TINY])
    assert f"contact map: {out / 'contacts.h5'}" in capsys.readouterr().out
    contacts = _check_outputs(out, query)
    # predict_contacts stores float16: within half a float16 ulp of each probability (<= 2^-12 for p < 1)
    np.testing.assert_allclose(_predict_again(tmp_path, out, query), contacts, rtol=0, atol=2.0**-11)
    # rerun semantics (rerun.py): refused without an option (nothing changed), complete with
    # resume=true, replaced by a whole new run with overwrite=true
    before = (out / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        main([f"input={path}", f"output_dir={out}", "minutes=1", *TINY])
    assert e.value.code == 1 and "resume=true" in capsys.readouterr().err
    main([f"input={path}", f"output_dir={out}", "minutes=1", "resume=true", *TINY])
    assert (out / "summary.json").read_bytes() == before
    main([f"input={path}", f"output_dir={out}", "minutes=1", "overwrite=true", *TINY])
    np.testing.assert_allclose(_check_outputs(out, query), contacts, rtol=0, atol=1e-6)  # seeded: the same run


@pytest.mark.slow
@pytest.mark.parametrize("settings", [POTTS_TINY, TINY], ids=["attention_potts", "lm"])
def test_tool_on_homologs_of_a_structure_scores_it(tmp_path, settings):
    from protein_performer.recipes.family_contacts.rerun import read_summary

    _, query = read_query(str(STRUCTURE))
    rng = np.random.default_rng(1)
    homologs = ["".join(rng.choice(list(AA)) if rng.random() < 0.2 else a for a in query) for _ in range(40)]
    (tmp_path / "h.fasta").write_text("".join(f">h{n}\n{s}\n" for n, s in enumerate(homologs)))
    out = tmp_path / "out"
    main(
        [
            f"input={tmp_path / 'h.fasta'}",
            f"query={STRUCTURE}",
            f"structure={STRUCTURE}",
            f"output_dir={out}",
            *settings,
        ]
    )
    contacts = _check_outputs(out, query)
    summary = read_summary(out)
    assert summary["prepare"]["format"] == "unaligned homologs"
    assert summary["train"].get("global_step", summary["train"].get("steps")) == (6 if settings == TINY else 60)
    # the headline is the precision of the stored map's top pairs against the structure's contacts
    from protein_performer.analysis.contacts.metrics import contact_map, precision_at_k
    from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence, load_structures

    chain = load_structures(STRUCTURE)[0][0]
    true = contact_map(coords_on_sequence(chain, align_to_sequence(chain, query)))
    for rng_name, lo, hi in (("long", 24, None), ("medium", 12, 23), ("short", 6, 11)):
        expected = precision_at_k(contacts.astype(np.float64), true, lo, hi, 1.0)
        assert summary["scores"]["trained"][rng_name]["P@L"] == pytest.approx(expected, abs=1e-12), rng_name
    assert summary["headline"]["long_P@L"] == summary["scores"]["trained"]["long"]["P@L"]
    assert math.isfinite(summary["headline"]["random_long_P@L"])
