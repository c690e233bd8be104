"""Works outside a checkout (issue 18, item 4): the wheel, installed into a fresh venv apart from the
repository, runs the demo and every console script from an empty directory.

Offline: the wheel is built from a copy of the sources (``--no-build-isolation``: the setuptools
already installed), and the fresh venv sees the dependencies already installed here through a
``.pth`` line naming this interpreter's site-packages (a plain path line: the ``.pth`` files in that
folder, such as an editable install's finder of the checkout, are not run). The venv's own
site-packages comes first, so ``protein_performer`` is the installed wheel; the tests check that.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import h5py
import pytest

from protein_performer.analysis.contacts.predict import ContactsFile
from protein_performer.analysis.embed import read_embeddings
from protein_performer.analysis.maps.reader import MapsFile

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [
    "pp-ingest",
    "pp-train",
    "pp-export-attention",
    "pp-contacts",
    "pp-aa-similarity",
    "pp-predict-contacts",
    "pp-embed",
    "pp-family-contacts",
]
TIMEOUT = 300


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(root: Path) -> Path:
    """The wheel of a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("protein_performer", "conf", "data"):  # the package links to conf/ and data/
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _check(
        subprocess.run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    )
    (wheel,) = (root / "dist").glob("protein_performer-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel installed into a fresh venv: ``{"wheel", "venv", "bin", "python", "env"}``."""
    pytest.importorskip("setuptools", reason="the offline build (--no-build-isolation) uses the installed setuptools")
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(root)
    venv = root / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True))
    python = venv / "bin" / "python"
    purelib = Path(
        _check(
            subprocess.run(
                [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
            )
        ).stdout.strip()
    )
    (purelib / "_dependencies_of_the_test.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # no PP_SHARED_DATA: an installed package has no shared data folder (the recipe names input= / structures=)
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PP_SHARED_DATA")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PROTEIN_PERFORMER_TRACEBACK="0")
    install = [python, "-m", "pip", "--disable-pip-version-check", "install", "--no-index", "--no-deps", str(wheel)]
    _check(subprocess.run(install, capture_output=True, text=True, env=env, timeout=TIMEOUT))
    return {"wheel": wheel, "venv": venv, "bin": venv / "bin", "python": python, "env": env}


def _run(installed: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A command of the venv (``python`` or a console script), run from ``cwd``."""
    exe = installed["python"] if args[0] == "python" else installed["bin"] / args[0]
    return subprocess.run(
        [str(exe), *args[1:]], cwd=cwd, env=installed["env"], capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_sample(installed, tmp_path):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for name in (
        "protein_performer/conf/train.yaml",
        "protein_performer/conf/experiment/demo.yaml",
        "protein_performer/sample_data/README.md",
        "protein_performer/sample_data/uniprot_sample.fasta.gz",
        "protein_performer/sample_data/swissprot_sample.fasta.gz",
        "protein_performer/sample_data/swissprot_sample.pfam_hits.tsv",
        "protein_performer/sample_data/structures/biopython/LICENSE.rst",
        "protein_performer/sample_data/structures/biopython/1A8O.pdb",
    ):
        assert name in names, name
    assert not any(n.startswith(("tests/", "benchmarks/", "data/", "conf/")) for n in names)
    # the venv imports the installed wheel, not the checkout
    where = _check(
        _run(installed, tmp_path, "python", "-c", "import protein_performer; print(protein_performer.__file__)")
    )
    assert Path(where.stdout.strip()).is_relative_to(installed["venv"]), where.stdout
    for script in SCRIPTS:
        assert (installed["bin"] / script).is_file(), script


@pytest.mark.slow
def test_demo_from_an_empty_directory(installed, tmp_path):
    """`make demo` end to end (shortened to 40 steps), as a user of the installed package runs it:
    every stage through its real command line."""
    proc = _check(_run(installed, tmp_path, "python", "-m", "protein_performer.demo", "output_dir=out", "steps=40"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing written next to it
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    # ingest: the embedded 4,000 records, the two held-out Pfam families in ood
    splits = summary["manifest"]
    assert set(splits) == {"train", "valid", "test", "ood"}
    assert sum(s["n_sequences"] for s in splits.values()) > 3900
    assert splits["ood"]["n_sequences"] > 100
    # train: metrics for every split next to the unigram baseline, a real offline W&B run
    for split in ("valid", "test", "ood"):
        assert 0.0 < summary["train"][f"{split}/acc"] < 1.0
        assert summary["train"][f"{split}/unigram_ppl"] > 1.0
    assert list((out / "train" / "wandb").glob("offline-run-*"))
    # export + contacts + aa similarity
    assert (out / "maps_random.h5").stat().st_size > 0
    assert {"trained", "random_init"} <= set(summary["contacts"])
    for mean in summary["contacts"].values():
        assert 0.0 <= mean["long"]["P@L"] <= 1.0
    assert summary["aa_similarity"]["all_heads"]["n_pairs"] == 190
    assert "protein_performer demo: summary" in proc.stdout
    site = str(installed["venv"])
    assert f"{site}/" in (out / "demo.log").read_text()  # the sample came from the installed package
    with MapsFile(out / "maps.h5") as maps:
        assert len(maps) >= 8  # the 8 sample structures, some multi-chain


@pytest.mark.slow
def test_console_scripts_from_another_directory(installed, tmp_path):
    """Each console script on inputs given on the command line (copies outside the package)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy2(REPO / "data" / "swissprot_sample.fasta.gz", work / "mine.fasta.gz")
    shutil.copytree(REPO / "data" / "structures" / "biopython", work / "structures")
    with gzip.open(work / "mine.fasta.gz", "rt") as fh:
        records = fh.read().split(">")[1:6]
    (work / "few.fasta").write_text("".join(">" + r for r in records))
    run = lambda *args: _check(_run(installed, work, *args))  # noqa: E731

    run(
        "pp-ingest",
        "input=mine.fasta.gz",
        "output_dir=shards",
        "fractions={train: 0.8, valid: 0.1, test: 0.1}",
        "progress=false",
    )
    assert json.loads((work / "shards" / "manifest.json").read_text())["splits"]["train"]["n_sequences"] > 700
    run(
        "pp-train",
        "experiment=demo",
        "data.root=shards",
        "hydra.run.dir=run",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "module.warmup_steps=0",
    )
    ckpt = work / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "valid/acc" in json.loads((work / "run" / "metrics.json").read_text())
    common = ["crop=center", "progress=false", "num_threads=1"]
    run("pp-export-attention", f"checkpoint={ckpt}", "input=structures", "output=maps.h5", *common)
    with MapsFile(work / "maps.h5") as maps:
        assert len(maps) >= 8
    run("pp-contacts", "maps=maps.h5", "structures=structures", "output_dir=contacts")
    assert (work / "contacts" / "contact_head.json").is_file()
    assert json.loads((work / "contacts" / "report.json").read_text())["methods"]["trained"]["mean"]
    run("pp-aa-similarity", "maps=maps.h5", "output_dir=aa")
    assert json.loads((work / "aa" / "aa_similarity.json").read_text())["all_heads"]["n_pairs"] == 190
    run("pp-predict-contacts", f"checkpoint={ckpt}", "head=contacts", "input=few.fasta", "output=pred.h5", *common)
    with ContactsFile(work / "pred.h5") as pred:
        assert len(pred) == 5
    run("pp-embed", f"checkpoint={ckpt}", "input=few.fasta", "output=emb.h5", *common)
    assert len(read_embeddings(work / "emb.h5")["ids"]) == 5
    with h5py.File(work / "emb.h5", "r") as h5:
        assert h5.attrs["complete"]
    # the family recipe's pfam40 / kortemme40 data does not ship: a missing one names its option
    fam = _run(installed, work, "pp-family-contacts", "family=PF00072", "output_dir=fam")
    assert fam.returncode == 1 and "structures=" in fam.stderr, fam.stderr[-2000:]


def test_demo_names_a_missing_structures_folder(tmp_path):
    """A structures= that does not exist is one line naming the option, before any stage runs."""
    proc = subprocess.run(
        [sys.executable, "-m", "protein_performer.demo", "structures=nowhere", f"output_dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: demo: structures=nowhere not found (a folder of PDB / mmCIF files)"
    assert not (tmp_path / "out").exists()
