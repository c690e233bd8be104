"""Bad inputs to export_attention, contacts and aa_similarity (issue 10, item 4): each is one line
``error: <file>: <what to do>`` on stderr, exit code 1, no traceback, and nothing overwritten.

Most cases call the library function through :func:`protein_performer.errors.cli_errors` (what the
entry points wrap their work in) in-process; a few run the real command line to check the whole
path (Hydra, exit code, stderr). The full disk and the read-only directory are real tmpfs mounts
(skipped where ``mount`` is not permitted).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from protein_performer.analysis.aa_similarity import run_aa_similarity
from protein_performer.analysis.contacts import run_contacts
from protein_performer.analysis.export import run_export
from protein_performer.analysis.maps import write_maps
from protein_performer.analysis.structures import load_structures
from protein_performer.errors import cli_errors
from protein_performer.model.performer import PerformerConfig, PerformerLM

REPO = Path(__file__).resolve().parents[2]
STRUCTURES = REPO / "data" / "structures" / "biopython"
TINY = dict(
    vocab_size=29,
    max_len=96,
    dim=32,
    depth=2,
    heads=2,
    dim_head=16,
    ff_dim=64,
    attention="favor_relu",
    nb_features=16,
    causal=False,
)
SEQS = {
    "s1": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ",
    "s2": "MDIRQGPKEPFRDYVDRFYKTLRAEQASQEVKNWMTETLLVQNANPDCKTILKALGPGATLEEMMTACQG",
    "s3": "MKPVTLYDVAEYAGVSYQTVSRVVNQASHVSAKTREKVEAAMAELNYIPNR",
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint (ProteinLM layout), a FASTA file, a complete maps.h5 of the 8 repo structures."""
    d = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(**TINY))
    ckpt = d / "tiny.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": dict(TINY)},
            "global_step": 0,
            "epoch": 0,
        },
        ckpt,
    )
    (d / "other.yaml").write_text(json.dumps({**TINY, "dim": 48}))  # another shape
    fasta = d / "seqs.fasta"
    fasta.write_text("".join(f">{k}\n{s}\n" for k, s in SEQS.items()))
    chains, _ = load_structures(STRUCTURES)
    rng = np.random.default_rng(0)
    recs = [
        dict(
            id=c.name,
            sequence=c.sequence,
            source=c.key,
            attentions=rng.random((1, 2, len(c), len(c))).astype(np.float32),
        )
        for c in chains
    ]
    maps = d / "maps.h5"
    write_maps(maps, recs, apc=True)
    return {"dir": d, "ckpt": ckpt, "fasta": fasta, "maps": maps}


def _cli(capsys, fn, **kw) -> str:
    """Run ``fn`` the way the entry points do; returns the one stderr line (exit code 1 asserted)."""
    with pytest.raises(SystemExit) as e:
        cli_errors(fn)(**kw)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def _untouched(path: Path):
    """A pre-existing output, and a check that it is byte-for-byte the same afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"previous complete output\n")
    return lambda: path.read_bytes() == b"previous complete output\n"


def _export(files, **kw):
    args = dict(checkpoint=str(files["ckpt"]), input=str(files["fasta"]), progress=False)
    return {**args, **kw}


# ------------------------------------------------------------------------------ export_attention
def test_export_checkpoint_of_another_model_shape(files, tmp_path, capsys):
    out = tmp_path / "maps.h5"
    same = _untouched(out)
    err = _cli(capsys, run_export, **_export(files, output=str(out), model_config=str(files["dir"] / "other.yaml")))
    assert err.startswith(f"error: {files['ckpt']}: weights do not fit the model config")
    assert "size mismatch" in err and "give the model_config the checkpoint was trained with" in err
    assert same() and not (tmp_path / "maps.h5.partial").exists()


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_export_truncated_or_corrupted_checkpoint(files, tmp_path, capsys, damage):
    data = files["ckpt"].read_bytes()
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:  # bytes flipped in the middle
        mid = len(data) // 2
        bad.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 256]) + data[mid + 256 :])
    out = tmp_path / "maps.h5"
    same = _untouched(out)
    err = _cli(capsys, run_export, **_export(files, checkpoint=str(bad), output=str(out)))
    assert err.startswith(f"error: {bad}: ")
    assert "truncated / corrupted" in err or "weights do not fit" in err, err
    assert same()


def test_export_structure_inputs_that_are_not_structures(files, tmp_path, capsys):
    junk = tmp_path / "junk.pdb"
    junk.write_text("this is not a PDB file\n")
    out = tmp_path / "maps.h5"
    same = _untouched(out)
    err = _cli(capsys, run_export, **_export(files, input=str(junk), output=str(out)))
    assert err.startswith(f"error: {junk}: no protein chain") and "no atoms found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli(capsys, run_export, **_export(files, input=str(empty), output=str(out)))
    assert err == (
        f"error: {empty}: no structure files (.pdb, .cif, .ent, .gz) in this folder; give a folder "
        "of PDB / mmCIF files or a FASTA file"
    )
    err = _cli(capsys, run_export, **_export(files, input=str(tmp_path / "absent.fasta"), output=str(out)))
    assert err == f"error: input not found: {tmp_path / 'absent.fasta'}"
    assert same()


def test_export_output_that_is_a_directory_or_under_a_file(files, tmp_path, capsys):
    d = tmp_path / "out_dir"
    d.mkdir()
    err = _cli(capsys, run_export, **_export(files, output=str(d)))
    assert err == f"error: {d}: is a directory; output= names the maps.h5 file to write"
    f = tmp_path / "a_file"
    f.write_text("keep me")
    err = _cli(capsys, run_export, **_export(files, output=str(f / "maps.h5")))
    assert err == f"error: {f}: is a file, but output={f / 'maps.h5'} needs it to be a directory"
    assert f.read_text() == "keep me" and list(d.iterdir()) == []


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): the case needs a real small / read-only disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_export_into_a_read_only_directory(files, tmp_path, capsys):
    ro = tmp_path / "ro"
    with _tmpfs(ro, "size=1m,ro"):
        err = _cli(capsys, run_export, **_export(files, output=str(ro / "maps.h5")))
        assert err == f"error: {ro}: not writable (permission denied); choose a writable output path"
        err = _cli(capsys, run_contacts, maps=files["maps"], structures=STRUCTURES, output_dir=ro / "report")
        assert "read-only" in err or "not writable" in err or "permission denied" in err, err
        assert err.startswith(f"error: {ro / 'report'}")
        assert list(ro.iterdir()) == []


def test_export_on_a_disk_that_fills_up(files, tmp_path):
    """A 1 MiB tmpfs; the export of 200 sequences (~26 MB) fills it: the real command line says so,
    leaves the old output untouched and only an interrupted ``.partial`` that readers refuse."""
    small = tmp_path / "small"
    with _tmpfs(small, "size=1m"):
        out = small / "maps.h5"
        same = _untouched(out)
        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(json.dumps(TINY))
        cmd = [
            sys.executable,
            "-m",
            "protein_performer.export_attention",
            "checkpoint=random",
            f"model_config={cfg}",
            f"input={REPO / 'data' / 'swissprot_sample.fasta.gz'}",
            f"output={out}",
            "crop=start",
            "max_sequences=200",
            "num_threads=1",
            "progress=false",
        ]
        res = subprocess.run(
            cmd,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, PYTHONPATH=str(REPO), PROTEIN_PERFORMER_TRACEBACK="0"),
        )
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"error: {out}.partial: no space left on the device (or the file size limit reached) while writing {out} ("
        )
        assert last.endswith("; free space and rerun with resume=true")
        assert same()
        from protein_performer.analysis.maps import MapsFile
        from protein_performer.errors import IncompleteOutputError, UserError

        with pytest.raises((IncompleteOutputError, UserError)):
            MapsFile(out.with_name("maps.h5.partial"))


# ------------------------------------------------------------------------------ contacts / aa_similarity
def _other_vocab(src: Path, dst: Path, legacy: bool) -> None:
    """``src`` as another tokenizer would have written it: a different ``vocab`` attribute, or
    (legacy: no vocab attribute) token ids shifted by one."""
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as h5:
        if legacy:
            del h5.attrs["vocab"]
            for g in h5.values():
                t = g["tokens"][()]
                g["tokens"][...] = t + 1
        else:
            h5.attrs["vocab"] = json.dumps(["<cls>", "<pad>", "<eos>", "<unk>"] + list("LAGVSERTIDPKQNFYMHWCXBUZO"))


@pytest.mark.parametrize("legacy", [False, True])
def test_maps_from_another_tokenizer(files, tmp_path, capsys, legacy):
    other = tmp_path / "other.h5"
    _other_vocab(files["maps"], other, legacy)
    out = tmp_path / "report"
    out.mkdir()
    same = _untouched(out / "report.json")
    for fn, kw in ((run_contacts, dict(structures=STRUCTURES)), (run_aa_similarity, {})):
        err = _cli(capsys, fn, maps=other, output_dir=out, **kw)
        if legacy:
            assert err.startswith(f"error: {other} record ") and "not this tokenizer's ids" in err
        else:
            assert err.startswith(f"error: {other}: written with another tokenizer vocabulary")
        assert err.endswith("export the maps again with this version of protein_performer")
    assert same() and sorted(p.name for p in out.iterdir()) == ["report.json"]


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_truncated_or_corrupted_maps(files, tmp_path, capsys, damage):
    data = files["maps"].read_bytes()
    bad = tmp_path / "bad.h5"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:  # bytes flipped in the middle of the attention maps of the middle record (both commands read them)
        with h5py.File(files["maps"], "r") as h5:
            names = list(h5)
            info = h5[names[len(names) // 2]]["attentions"].id.get_chunk_info(0)
        at = info.byte_offset + info.size // 2
        n = min(256, info.size // 4)
        bad.write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at : at + n]) + data[at + n :])
    out = tmp_path / "report"
    same = _untouched(out / "aa_similarity.json")
    for fn, kw in ((run_contacts, dict(structures=STRUCTURES)), (run_aa_similarity, {})):
        err = _cli(capsys, fn, maps=bad, output_dir=out, **kw)
        assert err.startswith(f"error: {bad}")
        assert "truncated / corrupted" in err or "the file is corrupted" in err, err
        assert err.endswith("export it again")
    assert same()


def test_structures_that_are_not_structures_or_missing(files, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    same = _untouched(out / "report.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli(capsys, run_contacts, maps=files["maps"], structures=empty, output_dir=out)
    assert err.startswith(f"error: {empty}: no structure files (.pdb, ") and "in this folder" in err
    # structures=<a file that is not a structure> (here: the maps file itself)
    err = _cli(capsys, run_contacts, maps=files["maps"], structures=files["maps"], output_dir=out)
    assert err.startswith(f"error: {files['maps']}: no usable structure chain") and "PDB" in err
    junk = tmp_path / "junk.cif"
    junk.write_text("data_x\n_this.is not a structure\n")
    err = _cli(capsys, run_contacts, maps=files["maps"], structures=junk, output_dir=out)
    assert err.startswith(f"error: {junk}: no usable structure chain ({junk}: ")
    err = _cli(capsys, run_contacts, maps=files["maps"], structures=tmp_path / "absent", output_dir=out)
    assert err == f"error: structures not found: {tmp_path / 'absent'}"
    assert same()


def test_directory_where_a_file_is_expected_and_the_reverse(files, tmp_path, capsys):
    d = tmp_path / "a_dir"
    d.mkdir()
    for fn, kw in ((run_contacts, dict(structures=STRUCTURES)), (run_aa_similarity, {})):
        err = _cli(capsys, fn, maps=d, output_dir=tmp_path / "r", **kw)
        assert err == f"error: {d}: is a directory, but a maps.h5 file is expected here"
    f = tmp_path / "a_file"
    f.write_text("keep me")
    for fn, kw in ((run_contacts, dict(structures=STRUCTURES)), (run_aa_similarity, {})):
        err = _cli(capsys, fn, maps=files["maps"], output_dir=f, **kw)
        assert err == f"error: {f}: is a file, but output_dir= must be a directory"
    assert f.read_text() == "keep me"


def test_command_lines_exit_1_with_one_line(files, tmp_path):
    """The real entry points: exit code 1, one ``error:`` line, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PROTEIN_PERFORMER_TRACEBACK="0")
    d = tmp_path / "a_dir"
    d.mkdir()
    cases = [
        (
            [
                "protein_performer.export_attention",
                f"checkpoint={files['ckpt']}",
                f"input={files['fasta']}",
                f"output={tmp_path / 'm.h5'}",
                f"model_config={files['dir'] / 'other.yaml'}",
            ],
            f"error: {files['ckpt']}: weights do not fit the model config",
        ),
        (
            ["protein_performer.contacts", f"maps={d}", f"structures={STRUCTURES}", f"output_dir={tmp_path / 'r'}"],
            f"error: {d}: is a directory, but a maps.h5 file is expected here",
        ),
    ]
    for args, start in cases:
        res = subprocess.run(
            [sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 1, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and res.stderr.strip().splitlines()[-1].startswith(start), res.stderr
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "m.h5.partial").exists()
