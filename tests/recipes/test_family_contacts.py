"""The family-contacts recipe (issue 12, item 3): the scorer on planted maps, the hold-out of the
test chain's near copies, and a tiny end-to-end run (a few hundred domains, a few steps) on the
shared pfam40 / kortemme40 data whose summary is recomputed here from the exported maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protein_performer.analysis.alignment import aligned_positions, identity
from protein_performer.analysis.contacts import apc, precision_at_k, symmetrize
from protein_performer.analysis.maps import MapsFile
from protein_performer.analysis.structures import load_structures
from protein_performer.cli.family_contacts import data_groups, parse
from protein_performer.errors import UserError
from protein_performer.recipes.family_contacts import rerun
from protein_performer.recipes.family_contacts.data import SpanCollator, mask_spans
from protein_performer.recipes.family_contacts.extract import holdout_similar
from protein_performer.recipes.family_contacts.run import STAGES, run
from protein_performer.recipes.family_contacts.scoring import homolog_averaged_map, mean_apc_maps, score_map


def _planted_contacts(L: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = (rng.random((L, L)) < 0.08).astype(float)
    t = np.maximum(t, t.T)
    np.fill_diagonal(t, 1.0)
    t[5, :] = t[:, 5] = np.nan  # an unresolved residue
    return t


def test_score_map_on_planted_maps():
    true = _planted_contacts()
    L = true.shape[0]
    perfect = np.nan_to_num(true)
    s = score_map(perfect, true)
    i, j = np.triu_indices(L, k=24)
    n_long = int(np.nansum(true[i, j]))
    assert n_long >= L  # so a perfect map fills its top L with contacts
    assert s["long"]["P@L"] == 1.0 and s["long"]["P@L/5"] == 1.0
    assert s["long_density"] == pytest.approx(n_long / np.isfinite(true[i, j]).sum())
    # a constant map scores exactly the density (ties count with their mean label)
    assert score_map(np.ones((L, L)), true)["long"]["P@L"] == pytest.approx(s["long_density"])
    # the inverted map ranks every non-contact first
    assert score_map(-perfect, true)["long"]["P@L"] == 0.0


def test_mean_apc_maps_is_the_mean_of_each_head():
    rng = np.random.default_rng(1)
    a = rng.random((3, 2, 10, 10))
    m = mean_apc_maps(a)
    assert set(m) == {"mean", "layer0", "layer1", "layer2"}
    np.testing.assert_allclose(m["mean"], (a[0, 0] + a[0, 1] + a[1, 0] + a[1, 1] + a[2, 0] + a[2, 1]) / 6)
    np.testing.assert_allclose(m["layer2"], (a[2, 0] + a[2, 1]) / 2)


def test_holdout_removes_the_test_chain_and_near_copies():
    target = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKR"
    mutant = "A" + target[1:10] + "W" + target[11:30] + "W" + target[31:]  # 3 substitutions, no gap
    n_diff = sum(a != b for a, b in zip(mutant, target))
    assert n_diff == 3
    other = "GSHMSLFDFFKNKGSAEDSDSKLAEAIEKAIEAAKKGDLEAAKKLLEEAIKLAKESGN"
    assert identity(target, target) == 1.0
    assert identity(mutant, target) == (len(target) - 3) / len(target)
    kept, removed = holdout_similar([("a x", target), ("b x", mutant), ("c x", other)], target, 0.9)
    assert [h for h, _ in kept] == ["c x"]
    assert [r["id"] for r in removed] == ["a", "b"]
    kept, _ = holdout_similar([("b x", mutant)], target, 0.99)
    assert len(kept) == 1


def test_shared_data_folder_is_the_variable_else_beside_the_checkout(monkeypatch, tmp_path, repo_root):
    from protein_performer import resources

    monkeypatch.setenv("PP_SHARED_DATA", str(tmp_path))
    assert resources.shared_data() == tmp_path
    monkeypatch.delenv("PP_SHARED_DATA")
    assert resources.shared_data() == repo_root.parent / "shared" / "data"
    monkeypatch.setattr(resources, "CHECKOUT", None)  # an installed package: only the variable
    assert resources.shared_data() is None


def test_recipe_without_a_shared_data_default_names_the_option(tmp_path):
    """An installed package without $PP_SHARED_DATA has no default input= / structures=."""
    with pytest.raises(UserError, match="give structures=<kortemme40 dir>"):
        run("PF00072", tmp_path / "out", input=None, structures=None)
    with pytest.raises(UserError, match="give input=<pfam40_domains.fasta.gz>"):
        run("PF00072", tmp_path / "out", input=None, structures=tmp_path)
    assert not (tmp_path / "out").exists()


def test_input_is_the_fasta_and_data_the_hydra_group():
    """``input=`` names the FASTA; ``data=<group>`` goes to training; the old ``data=<file>`` is one
    error naming ``input=`` (it no longer becomes a file path, nor a group Hydra cannot find)."""
    opts, overrides = parse(["family=PF00072", "output_dir=o", "input=fam.fasta", "data=family", "model.dim=64"])
    assert opts["input"] == "fam.fasta" and overrides == ["data=family", "model.dim=64"]
    assert set(data_groups()) >= {"default", "family"}
    with pytest.raises(UserError, match=r"FASTA is input=<pfam40_domains.fasta.gz>: give input=/d/pfam40.fasta.gz$"):
        parse(["family=PF00072", "output_dir=o", "data=/d/pfam40.fasta.gz"])
    with pytest.raises(UserError, match="expected key=value"):
        parse(["family=PF00072", "output_dir=o", "fasta=x"])


def test_resume_reads_a_run_that_recorded_the_fasta_as_data(tmp_path):
    """A summary written before the option was named input= (settings["data"]) resumes as the same run;
    another FASTA is refused, naming overwrite=true."""
    out = tmp_path / "out"
    out.mkdir()
    current = rerun.settings([], "family_contacts", False, family="PF1", input=tmp_path / "a.fa", structures=tmp_path)
    recorded = {("data" if k == "input" else k): v for k, v in current.items()}
    seconds = {stage: 1.0 for stage in STAGES}
    (out / "summary.json").write_text(json.dumps({"settings": recorded, "seconds": seconds}))
    assert rerun.plan(out, STAGES, STAGES, current, resume=True, overwrite=False) is None
    other = {**current, "input": str(tmp_path / "b.fa")}
    with pytest.raises(UserError, match="other settings.*overwrite=true"):
        rerun.plan(out, STAGES, STAGES, other, resume=True, overwrite=False)


@pytest.mark.slow
def test_tiny_end_to_end(shared_data, tmp_path):
    out = tmp_path / "fam"
    s = run(
        "PF00226",
        out,
        input=shared_data / "pfam40_domains.fasta.gz",
        structures=shared_data / "structures" / "kortemme40",
        max_sequences=200,
        probe_every_s=1000,
        homologs=3,
        overrides=[
            "trainer.max_steps=6",
            "trainer.max_time=null",
            "model.depth=2",
            "model.dim=32",
            "model.dim_head=8",
            "model.ff_dim=64",
            "model.nb_features=16",
            "data.batch_size=8",
            "module.warmup_steps=0",
            "trainer.log_every_n_steps=1",
        ],
    )
    for name in (
        "family.fasta",
        "shards/manifest.json",
        "checkpoints/last.ckpt",
        "maps.h5",
        "maps_random.h5",
        "summary.json",
        "contacts.png",
        "probe.jsonl",
    ):
        assert (out / name).exists(), name
    assert s.record["extract"]["n_family"] == 2635 and s.record["extract"]["n_written"] == 200
    assert sum(s.record["shards"].values()) == 200
    assert s.train["global_step"] == 6
    assert json.loads((out / "summary.json").read_text())["headline"] == s.headline
    ha = s.homolog_averaged
    assert ha["n_homologs"] == 3 and 0.0 <= ha["trained"]["long"]["P@L"] <= 1.0
    assert ha["trained"]["long_density"] == s.headline["long_density"]

    # recompute the headline from the exported maps: mean over layers x heads of apc(A + A^T)
    chain = load_structures(s.record["structure"])[0][0]
    from protein_performer.analysis.contacts import contact_map
    from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence

    true = contact_map(coords_on_sequence(chain, align_to_sequence(chain, chain.sequence)))
    for maps, key in ((out / "maps.h5", "trained"), (out / "maps_random.h5", "random_init")):
        with MapsFile(maps) as mf:
            (rec,) = list(mf.iter(load=("attentions",)))
        assert rec.attentions.shape[:2] == (2, 4)
        # as score_maps: float32 APC features, their mean over the 8 maps in float64. A float32 mean
        # differs from it by up to ~8 eps32 |x| ~ 5e-7 |x|, enough to swap two near-tied pairs across
        # a top-k boundary (each swap moves a P@k by 1/k). In float64 a sum of 8 float32 values is
        # exact unless their magnitudes span more than ~2^26, so the order of the sum does not matter
        # (and at worst moves a score by ~8 eps64 |x| ~ 2e-15 |x|).
        mean = apc(symmetrize(rec.attentions.astype(np.float32))).astype(np.float64).mean((0, 1))
        for rng_name, lo, hi in (("long", 24, None), ("medium", 12, 23), ("short", 6, 11)):
            for k, f in (("P@L", 1.0), ("P@L/5", 0.2)):
                assert s.record["scores"][key]["mean"][rng_name][k] == pytest.approx(
                    precision_at_k(mean, true, lo, hi, f), abs=1e-12
                ), (key, rng_name, k)
        assert set(s.record["scores"][key]) == {"mean", "layer0", "layer1"}
    # the in-training probe's last row scores the same model (float32 maps vs the export's float16:
    # a near-tie can swap, each swap moving P@L by 1/L)
    probe = s.record["probe"]
    assert probe[0]["step"] == 0 and probe[-1]["step"] == 6
    assert abs(probe[-1]["long_P@L"] - s.headline["long_P@L"]) <= 2 / len(chain.sequence) + 1e-12


def test_mask_spans_masks_runs_at_the_asked_rate():
    from protein_performer.data.tokenizer import Tokenizer

    tok = Tokenizer()
    residues = tok.encode("ACDEFGHIKLMNPQRSTVWY" * 50)  # 1000 residues
    tokens = np.concatenate([[tok.bos_id], residues, [tok.eos_id]])
    span, p, n = 5, 0.3, 1000
    fracs = []
    for seed in range(20):
        out, y = mask_spans(tokens, np.random.default_rng(seed), p, span, tok.mask_id, tok.n_special, tok.residue_ids)
        sel = y >= 0
        assert not sel[0] and not sel[-1]  # special tokens never targets
        np.testing.assert_array_equal(y[sel], tokens[sel])
        assert (out[~sel] == tokens[~sel]).all()
        # every run of targets is at least `span` long, except one clipped by the sequence end
        edges = np.flatnonzero(np.diff(np.concatenate([[0], sel[1:-1].astype(int), [0]])))
        runs = edges[1::2] - edges[::2]
        assert (runs[:-1] >= span).all() and len(runs) > 1
        fracs.append(sel.mean())
    # starts ~ Bernoulli(p / span); overlaps make the fraction 1 - (1 - p/span)^span = 0.266 for 0.3, 5
    expected = 1 - (1 - p / span) ** span
    # sd of one sequence's fraction <= sqrt(span * expected / n) (runs of `span`); mean of 20: /sqrt(20)
    assert abs(np.mean(fracs) - expected) < 4 * np.sqrt(span * expected / n / 20)
    a = mask_spans(tokens, np.random.default_rng(3), p, span, tok.mask_id, tok.n_special, tok.residue_ids)
    b = mask_spans(tokens, np.random.default_rng(3), p, span, tok.mask_id, tok.n_special, tok.residue_ids)
    np.testing.assert_array_equal(a[0], b[0])


def test_family_datamodule_span_collator():
    c = SpanCollator(objective="bid", max_length=64, mask_prob=0.3, seed=0, span=4)
    item = np.arange(4, 24, dtype=np.uint8).repeat(3)[:60]
    batch = c([item, item], [0, 1], epoch=0)
    sel = (batch["targets"][0] >= 0).numpy()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], sel.astype(int), [0]])))
    runs = edges[1::2] - edges[::2]
    assert runs.max() >= 4 and sel.sum() >= 4
    plain = SpanCollator(objective="bid", max_length=64, mask_prob=0.3, seed=0, span=1)
    from protein_performer.data.collate import Collator

    ref = Collator(objective="bid", max_length=64, mask_prob=0.3, seed=0)([item], [0])
    np.testing.assert_array_equal(plain([item], [0])["targets"], ref["targets"])


def test_aligned_positions_skip_an_insertion():
    target = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    seq = target[:10] + "WWW" + target[10:]  # 3 inserted residues
    src, dst = aligned_positions(seq, target)
    np.testing.assert_array_equal(dst, np.arange(len(target)))
    np.testing.assert_array_equal(src, np.r_[0:10, 13 : len(seq)])


def test_homolog_averaged_map_of_copies_is_the_chain_map():
    import torch

    from protein_performer.analysis.export import run_sequence
    from protein_performer.analysis.maps import apc_maps
    from protein_performer.data.tokenizer import Tokenizer
    from protein_performer.model.performer import PerformerConfig, PerformerLM

    torch.manual_seed(0)
    model = PerformerLM(
        PerformerConfig(
            vocab_size=29, max_len=64, dim=16, depth=2, heads=2, dim_head=8, ff_dim=32, dropout=0.0, attention="exact"
        )
    ).eval()
    target = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    maps = []
    run_sequence(model, Tokenizer().encode(target), on_layer=lambda i, m: maps.append(m.numpy()))
    single = apc_maps(np.stack(maps)).astype(np.float64).mean((0, 1))
    with torch.no_grad():
        avg = homolog_averaged_map(model, target, [target, target])
    np.testing.assert_allclose(avg, single, rtol=1e-6, atol=1e-9)
    # a homolog with an insertion only contributes on the target's positions: still defined everywhere
    with torch.no_grad():
        avg2 = homolog_averaged_map(model, target, [target[:10] + "WWW" + target[10:]])
    assert np.isfinite(avg2).all() and avg2.shape == single.shape
    assert not np.allclose(avg2, single)
