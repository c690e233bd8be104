"""The notebooks are stored with their outputs (run by notebooks/execute.py on the family-contacts
recipe's outputs): every code cell run once, in order, figures as PNGs of reasonable size, no error
output, no absolute path of the machine that ran them.

They also still run top to bottom (nbclient, the venv's kernel) on demo-size outputs made here:
a tiny model trained for 3 steps by the training code, its maps and a random-init model's maps of the
embedded structures, and the contacts report. Any cell error fails the test; each test then checks
the notebook's numbers against the library computed here."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from conftest import REPO
from nbclient import NotebookClient
from trained import STRUCTURES, trained_checkpoint

from protein_performer.analysis.export import run_export

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_SECONDS = 60  # a cell taking longer fails the test (each notebook runs in well under 20 s)
MAX_STORED_BYTES = 600 * 1024  # a stored notebook (outputs included) stays light for the repository page
NAMES = ("aa_similarity.ipynb", "attention_maps.ipynb", "contacts.ipynb")
FIGURES = {"aa_similarity.ipynb": 1, "attention_maps.ipynb": 2, "contacts.ipynb": 3}  # with the recipe's outputs


def _executor():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_notebooks_here_are_the_stored_ones():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_with_its_outputs(name):
    """Run once top to bottom on the recipe's outputs, figures visible without running anything."""
    path = NOTEBOOKS / name
    assert path.stat().st_size < MAX_STORED_BYTES
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not run once, in order"
    assert all(c.outputs for c in code[:2]), "the input cells print where their inputs come from"
    assert "(the family-contacts recipe)" in code[0].outputs[0]["text"]  # not the demo's tiny model
    assert _executor().leaks(nb) == []  # no error output, no absolute path
    pngs = [o["data"]["image/png"] for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == FIGURES[name]
    for png in pngs:
        assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaks_finds_errors_and_absolute_paths():
    leaks = _executor().leaks
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="../demo_out/maps.h5: 9 sequences\n")]
    assert leaks(nb) == []
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="read /tmp/x/maps.h5\n")]
    assert leaks(nb) == ["cell 0: absolute path in output: /tmp/"]
    nb.cells[0].outputs = [nbformat.v4.new_output("error", ename="KeyError", evalue="k", traceback=[])]
    assert leaks(nb) == ["cell 0: error output KeyError"]


@pytest.fixture(scope="module", autouse=True)
def python3_kernel():
    """The ``python3`` kernel must be this interpreter (the venv's). jupyter_client runs
    ipykernel's own spec (argv ``python``) with ``sys.executable``; when no ``python3`` spec is
    found at all, install one into this environment (``ipykernel install --sys-prefix``)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
            check=True,
            capture_output=True,
        )


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """The files ``make demo`` leaves in demo_out/, at test size."""
    from protein_performer.analysis.contacts import run_contacts

    ckpt = trained_checkpoint(tmp_path_factory)
    out = tmp_path_factory.mktemp("demo_out")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_export(str(ckpt), str(STRUCTURES), str(out / "maps.h5"), progress=False)
        run_export("random", str(STRUCTURES), str(out / "maps_random.h5"), model_config=str(ckpt), progress=False)
    finally:
        torch.set_num_threads(n)
    # one thread, as the notebooks run (OMP_NUM_THREADS=1): the contacts regression then ranks the same
    # float64 scores in both, whatever this machine's core count
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        run_contacts(out / "maps.h5", STRUCTURES, out / "contacts", baseline_maps=out / "maps_random.h5", n_plots=0)
    return out


def run_notebook(name: str, env: dict[str, str], monkeypatch, probe: str) -> dict:
    """Execute ``notebooks/<name>`` with ``env``; a ``probe`` cell appended at the end prints JSON,
    returned here (with the kernel's interpreter and the wall time)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PP_RUN", "")  # the demo-size outputs made here, not a family-contacts recipe's
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models on shared cores
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # stored with the recipe's outputs: run afresh on the demo's
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import json as _json, sys as _sys\n"
            f"_probe = {probe}\n"
            "_probe['python'] = _sys.executable\n"
            "print(_json.dumps(_probe, default=float))"
        )
    )
    t0 = time.perf_counter()
    NotebookClient(
        nb, kernel_name="python3", timeout=NOTEBOOK_SECONDS, resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    seconds = time.perf_counter() - t0
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    result = json.loads(text.strip().splitlines()[-1])
    result["seconds"] = seconds
    assert Path(result["python"]).resolve() == Path(sys.executable).resolve(), "kernel is not this interpreter"
    figures = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    result["figures"] = figures
    return result


def test_attention_maps_notebook(demo_out, monkeypatch):
    from protein_performer.analysis.maps import MapsFile

    res = run_notebook(
        "attention_maps.ipynb",
        {"PP_MAPS": str(demo_out / "maps.h5"), "PP_PROTEIN": "1A8O_A"},
        monkeypatch,
        "{'protein': rec.id, 'shape': list(A.shape), 'counts': counts, "
        "'local00': float(mean_scores[0, 0, 0]), 'records': len(records)}",
    )
    assert res["protein"] == "1A8O_A" and res["shape"] == [2, 2, 70, 70]
    assert res["records"] == 9 and sum(res["counts"].values()) == 4
    assert res["figures"] == 2  # the layers x heads grid and the typical heads
    # the local score of layer 1 head 1, averaged over the sequences, recomputed here
    scores = []
    with MapsFile(demo_out / "maps.h5") as mf:
        for rec in mf.iter(load=("attentions",)):
            a = rec.attentions[0, 0].astype(np.float64)
            a = a / a.sum()
            L = len(rec)
            i, j = np.indices(a.shape)
            band = np.abs(i - j) <= 2
            u = band.sum() / L**2
            scores.append((a[band].sum() - u) / (1 - u))
    assert res["local00"] == pytest.approx(np.mean(scores), rel=1e-4)
    assert res["seconds"] < 40


def test_contacts_notebook(demo_out, monkeypatch):
    env = {
        "PP_MAPS": str(demo_out / "maps.h5"),
        "PP_MAPS_RANDOM": str(demo_out / "maps_random.h5"),
        "PP_CONTACTS": str(demo_out / "contacts"),
        "PP_STRUCTURES": str(STRUCTURES),
    }
    res = run_notebook(
        "contacts.ipynb",
        env,
        monkeypatch,
        "{'n': len(proteins), 'means': {m: v['mean'] for m, v in report['methods'].items()}}",
    )
    assert res["n"] == 9
    saved = json.loads((demo_out / "contacts" / "report.json").read_text())
    assert set(res["means"]) == {f"{k}{x}" for k in ("trained", "random_init") for x in ("", "_best_head", "_mean")}
    for m, table in res["means"].items():  # the notebook reproduces the contacts step's report
        for r, ks in table.items():
            for k, v in ks.items():
                # precisions are means of k/n counts from the same float64 scores; the fixture and the
                # notebook both run single-threaded, so rankings (and ties) are the same; 1e-9 leaves
                # room for the order of the final float64 mean only
                assert v == pytest.approx(saved["methods"][m]["mean"][r][k], abs=1e-9), (m, r, k)
    assert res["figures"] == 2
    assert res["seconds"] < 40


def test_aa_similarity_notebook(demo_out, monkeypatch):
    from protein_performer.analysis.aa_similarity import aa_attention_matrix, blosum_correlation
    from protein_performer.analysis.maps import MapsFile

    res = run_notebook(
        "aa_similarity.ipynb",
        {"PP_MAPS": str(demo_out / "maps.h5"), "PP_MAPS_RANDOM": str(demo_out / "maps_random.h5")},
        monkeypatch,
        "{'n': n_seq, 'corr': corr, 'n_heads': len(rows), 'baseline': baseline is not None}",
    )
    with MapsFile(demo_out / "maps.h5") as mf:
        expected = blosum_correlation(aa_attention_matrix(mf.iter(load=("attentions",))))
    assert res["n"] == 9 and res["n_heads"] == 4 and res["baseline"]
    # The notebook (OMP_NUM_THREADS=1) and this process may sum the float32 attention maps in a
    # different order (BLAS/torch thread count): each amino-acid pair's mean then differs by a few
    # float32 ulps (relative ~1e-7 x sqrt(terms)), which moves a Pearson r of ~0.1 over ~190 pairs by
    # far less than 1e-6. A real difference (another layer, head or normalisation) moves it by > 1e-2.
    assert res["corr"]["pearson"] == pytest.approx(expected["pearson"], abs=1e-6)
    assert res["corr"]["n_pairs"] == expected["n_pairs"] > 150
    assert res["figures"] == 1
    assert res["seconds"] < 40
