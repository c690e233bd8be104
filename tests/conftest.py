"""Shared pytest fixtures: repository paths, the shared real-data folder, quiet offline W&B; the
overrides that make the demo experiment a tiny model for training tests (:func:`tiny_overrides`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from protein_performer import resources

REPO = Path(__file__).resolve().parents[1]

# the demo experiment made tinier: a training test on 2 CPU cores takes seconds. Tests import it
# (``from conftest import tiny_overrides``) and add what they need; see tiny_overrides.
TINY_DEMO = (
    "experiment=demo",
    "model.depth=2",
    "model.dim=32",
    "model.heads=2",
    "model.dim_head=16",
    "model.ff_dim=64",
    "model.nb_features=16",
    "data.batch_size=8",
    "data.max_length=64",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# Triton builds a kernel in interpreter mode only if TRITON_INTERPRET=1 is set when the kernel is
# decorated (when favor/triton_kernels.py is first imported, by whichever test comes first); with no
# GPU the kernels can only run in the interpreter, so set it for the whole session.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def sample_fasta() -> Path:
    """3,000 real UniProt sequences shipped in data/."""
    return REPO / "data" / "uniprot_sample.fasta.gz"


def tiny_overrides(*extra: str) -> list[str]:
    """Hydra overrides of ``train``: :data:`TINY_DEMO`, then ``extra`` in order. An ``extra`` that
    sets a key :data:`TINY_DEMO` sets (``"model.depth=1"``, ``"data.batch_size=4"``) takes its place
    in the list; any other is appended."""
    out = list(TINY_DEMO)
    keys = [o.split("=", 1)[0] for o in out]
    for override in extra:
        key = override.split("=", 1)[0]
        if "=" in override and key in keys:
            out[keys.index(key)] = override
        else:
            out.append(override)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``resources.shared_data()``: ``$PP_SHARED_DATA``, else
    ``../shared/data`` beside the checkout), or skip the test cleanly when it is absent."""
    folder = resources.shared_data()
    if folder is None or not folder.is_dir():
        pytest.skip(f"shared data folder not found at {folder} (set {resources.SHARED_DATA_VAR})")
    return folder.resolve()


def pytest_addoption(parser):
    parser.addoption(
        "--reverse-order",
        action="store_true",
        default=False,
        help="run the collected tests in reverse order (checks that no test depends on another's leftovers)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()


@contextlib.contextmanager
def one_thread():
    """``with one_thread():`` torch's thread count of the command runs (OMP_NUM_THREADS=1, num_threads=1)
    in this process: float32 results may depend on it (how a sum is split), so a reference computed
    here to compare with a run's output uses it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def single_thread():
    """The test runs torch on one intra-op thread (:func:`one_thread`): tiny models, where two threads
    wait on each other on a busy 2-core machine. A module takes it for all its tests with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory) -> Path:
    """The embedded Swiss-Prot sample ingested for real, once per session: train / valid / test and the
    OOD split of two held-out Pfam families (RRM_1, globins4). Tests read it and never write into it."""
    from protein_performer.data.ingest import ingest

    out = tmp_path_factory.mktemp("shards")
    ingest(
        input=str(REPO / "data" / "swissprot_sample.fasta.gz"),
        output_dir=str(out),
        annotations=str(REPO / "data" / "swissprot_sample.pfam_hits.tsv"),
        ood_families=["RRM_1", "globins4"],
        fractions={"train": 0.8, "valid": 0.1, "test": 0.1},
        workers=1,
        progress=False,
    )
    return out
