"""Structure parsing and sequence alignment on real PDB / mmCIF files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from Bio.PDB import PDBParser

from protein_performer.analysis.structures import (
    AlignmentMismatchError,
    StructureError,
    align_to_sequence,
    coords_on_sequence,
    load_structures,
    read_chains,
    virtual_cb,
)


@pytest.fixture(scope="module")
def kortemme(shared_data) -> Path:
    return shared_data / "structures" / "kortemme40"


@pytest.fixture(scope="module")
def biopython_dir(repo_root) -> Path:
    return repo_root / "data" / "structures" / "biopython"


def test_kortemme40_sequences_and_resolved_counts_match_chains_tsv(kortemme):
    rows = {r["file"]: r for r in csv.DictReader(open(kortemme / "chains.tsv"), delimiter="\t")}
    chains, failures = load_structures(kortemme)
    assert failures == [] and len(chains) == 40
    for c in chains:
        row = rows[Path(c.path).name]
        assert c.chain_id == row["chain"]
        assert c.sequence == row["atom_sequence"]
        assert len(c) == int(row["n_res"])
        assert int(c.resolved.sum()) == int(row["n_CA"])
        assert int(c.resolved.sum()) - c.n_virtual_cb == int(row["n_CB_or_GlyCA"])


def test_cb_coordinates_equal_biopython_atoms(kortemme):
    path = kortemme / "PF00013_1WVN_A.pdb"
    chain = read_chains(path)[0]
    bio = PDBParser(QUIET=True).get_structure("x", str(path))[0]["A"]
    ref = np.array([(r["CA"] if r.get_resname() == "GLY" else r["CB"]).coord for r in bio if r.id[0] == " "])
    np.testing.assert_allclose(chain.cb, ref, atol=1e-5)
    assert chain.resnums[0] == str(next(iter(bio)).id[1])


def test_residue_without_ca_is_kept_as_unresolved(kortemme):
    # 1TEN: the first residue (ARG 802) has only C and O atoms
    chain = read_chains(kortemme / "PF00041_1TEN_A.pdb")[0]
    assert chain.sequence[0] == "R" and chain.resnums[0] == "802"
    assert np.isnan(chain.cb[0]).all() and not chain.resolved[0]
    assert chain.resolved[1:].all()


def test_virtual_cb_ideal_geometry(kortemme):
    # on real residues with a C-beta, the ideal-geometry C-beta lies within a few tenths of an A
    bio = PDBParser(QUIET=True).get_structure("x", str(kortemme / "PF00013_1WVN_A.pdb"))[0]["A"]
    res = [r for r in bio if all(a in r for a in ("N", "CA", "C", "CB"))]
    xyz = {a: np.array([r[a].coord for r in res], dtype=np.float64) for a in ("N", "CA", "C", "CB")}
    dev = np.linalg.norm(virtual_cb(xyz["N"], xyz["CA"], xyz["C"]) - xyz["CB"], axis=1)
    assert len(res) > 50 and dev.mean() < 0.15 and dev.max() < 0.4
    # 3BR8 has one non-glycine residue with no C-beta: it gets the virtual one, 1.52 A from CA
    chain = read_chains(kortemme / "PF00708_3BR8_A.pdb")[0]
    assert chain.n_virtual_cb == 1
    d = np.linalg.norm(chain.cb - chain.ca, axis=1)
    gly = np.array([a == "G" for a in chain.sequence])
    assert np.allclose(d[gly], 0.0) and np.all(np.abs(d[~gly] - 1.53) < 0.06)


def test_multichain_mmcif_and_modified_residues(biopython_dir):
    chains, failures = load_structures(biopython_dir)
    assert failures == []
    keys = {c.key: c for c in chains}
    # 1LCD: chains B and C are DNA (no amino acids); 4ZHL chain P has 10 residues (< 30)
    assert set(keys) == {
        "1A7G.cif:E",
        "1A8O.pdb:A",
        "1GBT.cif:A",
        "1LCD.pdb:A",
        "2OFG.cif:X",
        "2XHE.pdb:A",
        "2XHE.pdb:B",
        "4CUP.cif:A",
        "4ZHL.cif:U",
    }
    # 1A8O: 66 standard residues + 4 selenomethionines (HETATM MSE) read as M
    a8o = keys["1A8O.pdb:A"]
    assert len(a8o) == 70 and a8o.sequence.count("M") >= 4
    # 1GBT (mmCIF) uses insertion codes (chymotrypsin numbering) without chain breaks
    gbt = keys["1GBT.cif:A"]
    assert any(r[-1].isalpha() for r in gbt.resnums) and gbt.chain_breaks() == []
    # an explicitly named short chain is read
    assert len(read_chains(biopython_dir / "4ZHL.cif", chains=["P"])[0]) == 10


def test_chain_breaks_follow_numbering_and_geometry(biopython_dir):
    chain = read_chains(biopython_dir / "2XHE.pdb", chains=["B"])[0]
    breaks = chain.chain_breaks()
    assert breaks == [(13, 23), (167, 17)]
    for k, n_missing in breaks:
        assert int(chain.resnums[k + 1]) - int(chain.resnums[k]) - 1 == n_missing
        assert np.linalg.norm(chain.ca[k + 1] - chain.ca[k]) > 4.2


def test_bad_files_are_named_and_batch_continues(tmp_path, kortemme):
    (tmp_path / "notes.pdb").write_text("this is not a structure\njust text\n")
    (tmp_path / "broken.cif").write_text("data_x\n_atom_site.id 1\nloop_\n_garbage\n")
    src = kortemme / "PF00013_1WVN_A.pdb"
    (tmp_path / src.name).symlink_to(src)
    for bad in ("notes.pdb", "broken.cif"):
        with pytest.raises(StructureError, match=bad):
            read_chains(tmp_path / bad)
    chains, failures = load_structures(tmp_path)
    assert [c.key for c in chains] == ["PF00013_1WVN_A.pdb:A"]
    assert sorted(Path(f.source).name for f in failures) == ["broken.cif", "notes.pdb"]


def test_chain_without_ca_and_missing_chain_are_errors(tmp_path, kortemme):
    lines = (kortemme / "PF00013_1WVN_A.pdb").read_text().splitlines()
    no_ca = [ln for ln in lines if not (ln.startswith("ATOM") and ln[12:16].strip() == "CA")]
    path = tmp_path / "noca.pdb"
    path.write_text("\n".join(no_ca) + "\n")
    with pytest.raises(StructureError, match=r"noca\.pdb chain A: no C-alpha"):
        read_chains(path)
    with pytest.raises(StructureError, match=r"noca\.pdb: chain\(s\) \['Q'\] not found"):
        read_chains(path, chains=["Q"])
    # two chains in one file, A without C-alpha atoms: B is still read, A is listed as a failure
    atoms = [ln for ln in lines if ln.startswith("ATOM")]
    two = [ln for ln in atoms if ln[12:16].strip() != "CA"] + ["TER"]
    two += [ln[:21] + "B" + ln[22:] for ln in atoms] + ["TER", "END"]
    (tmp_path / "noca.pdb").unlink()
    (tmp_path / "two.pdb").write_text("\n".join(two) + "\n")
    chains, failures = load_structures(tmp_path)
    assert [c.key for c in chains] == ["two.pdb:B"] and len(chains[0]) == 74
    assert [(Path(f.source).name, f.chain) for f in failures] == [("two.pdb", "A")]
    assert "two.pdb chain A: no C-alpha" in failures[0].reason


def test_alignment_keeps_chain_breaks_as_gaps(biopython_dir):
    chain = read_chains(biopython_dir / "2XHE.pdb", chains=["B"])[0]
    # the full sequence: the chain's residues with the unresolved stretches put back
    rng = np.random.default_rng(0)
    parts, expected, pos = [], [], 0
    breaks = dict(chain.chain_breaks())
    for k, aa in enumerate(chain.sequence):
        parts.append(aa)
        expected.append(pos)
        pos += 1
        if k in breaks:
            parts.append("".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), breaks[k])))
            pos += breaks[k]
    full = "".join(parts)
    aln = align_to_sequence(chain, full)
    assert len(full) == len(chain) + 23 + 17
    np.testing.assert_array_equal(np.nonzero(aln.seq_to_res >= 0)[0], expected)
    assert aln.n_identical == len(chain) and aln.n_mismatched == 0 and aln.identity == 1.0
    xyz = coords_on_sequence(chain, aln)
    assert np.isnan(xyz[14 : 14 + 23]).all() and np.allclose(xyz[37], chain.cb[14])
    # a longer sequence around the domain (free end gaps) maps the same way
    aln2 = align_to_sequence(chain, "MSTNPKL" + full + "GSHHHHHH")
    np.testing.assert_array_equal(aln2.seq_to_res[7 : 7 + len(full)], aln.seq_to_res)


def test_alignment_mismatches_are_reported(kortemme):
    chain = read_chains(kortemme / "PF00013_1WVN_A.pdb")[0]
    seq = list(chain.sequence)
    seq[10] = "W" if seq[10] != "W" else "A"
    seq[40] = "W" if seq[40] != "W" else "A"
    aln = align_to_sequence(chain, "".join(seq), max_mismatches=3)
    assert aln.n_mismatched == 2 and "2 mismatched residue pair(s)" in aln.problems[0]
    np.testing.assert_array_equal(aln.seq_to_res, np.arange(len(chain)))
    with pytest.raises(AlignmentMismatchError, match=r"PF00013_1WVN_A\.pdb chain A"):
        align_to_sequence(chain, "".join(seq), max_mismatches=1)
    other = read_chains(kortemme / "PF00018_2O9S_A.pdb")[0]
    with pytest.raises(AlignmentMismatchError, match="identity"):
        align_to_sequence(chain, other.sequence)
