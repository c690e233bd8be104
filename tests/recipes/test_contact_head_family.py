"""The recipe's leave-family-out contact head (recipes.family_contacts.head): fitted only on other
families' chains, scored on the family's chain, equal to fitting it by hand; it finds planted contacts."""

from __future__ import annotations

import numpy as np
import pytest

from protein_performer.analysis.contacts import MIN_SEP, Protein, fit_logistic, precision_table
from protein_performer.analysis.contacts.head import training_subset
from protein_performer.recipes.family_contacts.head import leave_family_out


def planted_protein(n: int, rng: np.random.Generator, L: int = 60, signal: float = 3.0) -> Protein:
    """A protein with random contacts; feature 0 of each map set carries them (plus noise), the
    other three are noise. ``signal`` 0: no map carries anything."""
    true = (rng.random((L, L)) < 0.08).astype(np.float64)
    true = np.triu(true, 1) + np.triu(true, 1).T
    i, j = np.triu_indices(L, k=MIN_SEP)
    p = Protein(f"PF{n:05d}_X_A", f"PF{n:05d}_X.pdb:A", "A" * L, true, i, j)
    for key, s in (("trained", signal), ("random_init", 0.0)):
        x = rng.normal(size=(len(i), 4)).astype(np.float32)
        x[:, 0] += s * true[i, j]
        p.features[key] = x
        p.n_heads[key] = (2, 2)
    return p


def test_leave_family_out_is_the_head_fitted_on_the_other_chains():
    rng = np.random.default_rng(0)
    proteins = [planted_protein(n, rng) for n in range(12)]
    family = proteins[4]
    res = leave_family_out(proteins, family.source, train_size=6, draws=3)
    assert res["protein"] == family.name and res["train_size"] == 6 and res["draws"] == 3
    others = [p for p in proteins if p is not family]
    tables = []
    for seed in range(3):
        train = [others[i] for i in training_subset([p.name for p in others], 6, seed)]
        assert family not in train
        model = fit_logistic(train, "trained", C=0.15, seed=seed)
        tables.append(
            precision_table(family.pred_matrix(model.predict_proba(family.features["trained"])[:, 1]), family.true)
        )
    assert res["trained"]["draws_long_P@L"] == [t["long"]["P@L"] for t in tables]
    assert res["trained"]["mean"]["long"]["P@L"] == pytest.approx(
        np.mean([t["long"]["P@L"] for t in tables]), abs=1e-15
    )
    # the planted feature gives contacts far above their density (~0.08); the noise-only maps do not:
    # with L = 60 the top 60 long-range pairs of noise hold ~0.08 * 60 = 5 +- 2 contacts
    assert res["trained"]["mean"]["long"]["P@L"] > 0.6
    assert res["random_init"]["mean"]["long"]["P@L"] < 0.25


def test_leave_family_out_refuses_a_missing_chain():
    rng = np.random.default_rng(1)
    proteins = [planted_protein(n, rng) for n in range(3)]
    with pytest.raises(Exception, match="PF09999_X.pdb:A is not among the exported chains"):
        leave_family_out(proteins, "PF09999_X.pdb:A")


@pytest.mark.slow
def test_contacts_stage_on_a_small_structure_folder(tmp_path_factory, tmp_path):
    """The recipe's contacts stage on the tiny trained model and the 9 embedded chains: the report's
    single split and the saved head share their training chains (fewer than ESM's 20 here: n - 1), the
    head is tied to the checkpoint, and the leave-family-out entry is leave_family_out on the same maps."""
    import json

    from trained import STRUCTURES, trained_checkpoint

    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.contacts.head import ContactHead
    from protein_performer.analysis.structures import load_structures
    from protein_performer.pretrained import load_model
    from protein_performer.recipes.family_contacts.head import HeadPaths, contacts_stage

    ckpt = trained_checkpoint(tmp_path_factory)
    structure = STRUCTURES / "1A8O.pdb"
    res = contacts_stage(ckpt, STRUCTURES, structure, tmp_path)
    paths = HeadPaths(tmp_path / "kortemme40")
    head = ContactHead.load(paths.head)
    report = json.loads((paths.contacts / "report.json").read_text())
    assert res["head"] == "kortemme40/contacts/contact_head.json" and res["n_proteins"] == 9
    assert len(head.training_proteins) == 8 == len(report["folds"][0]["train"])
    assert sorted(head.training_proteins) == sorted(report["folds"][0]["train"])
    assert head.checkpoint_sha256 == load_model(ckpt).sha256
    assert res["contacts_report"]["trained"] == report["methods"]["trained"]["mean"]["long"]
    chains, _ = load_structures(STRUCTURES)
    proteins, _ = load_proteins(paths.maps, chains, baseline_maps=paths.maps_random)
    expected = leave_family_out(proteins, "1A8O.pdb:A", train_size=8)
    assert res["leave_family_out"]["protein"] == "1A8O_A"
    for key in ("trained", "random_init"):
        assert res["leave_family_out"][key]["draws_long_P@L"] == expected[key]["draws_long_P@L"]
