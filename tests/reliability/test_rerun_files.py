"""Finished work is never destroyed by a rerun (issue 18, item 3), for the commands whose output
is one HDF5 file: ``export_attention``, ``embed`` and ``predict_contacts`` (with its ``csv=`` and
``png_dir=`` side outputs).

For each command, over one finished output (made in this process, shared by the tests):

- a rerun of the same command, SIGKILLed at seeded random moments (during its start-up, and while
  it writes ``<output>.partial``, at random fractions of the output's size), leaves the finished
  output byte-identical, with the same modification time, and readable by the package's reader;
- ``resume=true`` over it exits 0, says it is complete and changes nothing, without loading the
  model or reading the input;
- ``resume=true`` with other settings is refused, naming them.

The finished file is compared with itself before and after (never with a file computed in
another process).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import one_thread

from protein_performer.analysis.contacts.head import ContactHead
from protein_performer.analysis.contacts.predict import ContactsFile, run_predict_contacts
from protein_performer.analysis.embed import read_embeddings, run_embed
from protein_performer.analysis.export import run_export
from protein_performer.analysis.maps import MapsFile
from protein_performer.data.fasta import read_fasta
from protein_performer.errors import UserError
from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.pretrained import file_sha256

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "swissprot_sample.fasta.gz"
SEED = 20261207  # the kill moments
TINY = {
    "vocab_size": 29,
    "max_len": 96,
    "dim": 32,
    "depth": 2,
    "heads": 2,
    "dim_head": 16,
    "ff_dim": 64,
    "attention": "favor_relu",
    "nb_features": 16,
    "causal": False,
}
COMMANDS = ("export_attention", "embed", "predict_contacts")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PROTEIN_PERFORMER_TRACEBACK="0")


@dataclass
class Finished:
    """A finished output, the command line and the library call that made it, and its reader."""

    command: str
    output: Path
    args: list[str]  # key=value settings of the command line
    run: Callable[..., dict]  # the library call with the same settings; keyword overrides
    read: Callable[[Path], int]  # the package's reader: the number of records
    records: int
    module: str  # where the command's load_model / read_sequences live
    extras: list[Path] = field(default_factory=list)  # side outputs (files or folders) kept as they are

    def cli(self, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", f"protein_performer.{self.command}", *self.args]
        return cmd + ["num_threads=1", "progress=false", *extra]

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        """Every file of the output and its side outputs: bytes and modification time."""
        files = [self.output]
        for p in self.extras:
            files += sorted(p.iterdir()) if p.is_dir() else [p]
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    def leftovers(self) -> list[Path]:
        """What an unfinished run leaves beside the output (``<output>.partial``, its journal, ...)."""
        return sorted(self.output.parent.glob(self.output.name + ".*"))


def _fasta(path: Path, n: int) -> Path:
    out = []
    for rec in read_fasta(SAMPLE):
        out.append(f">{rec.header.decode().split()[0]}\n{rec.sequence.decode()}\n")
        if len(out) == n:
            break
    path.write_text("".join(out))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rerun_files")
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return work


@pytest.fixture(scope="module")
def export_attention(work) -> Finished:
    fasta = _fasta(work / "export.fasta", 60)
    out = work / "export" / "maps.h5"
    opts = {"model_config": str(work / "tiny.yaml"), "crop": "start"}

    def run(**kw):
        with one_thread():
            return run_export("random", str(fasta), str(out), progress=False, **{**opts, **kw})

    def read(path: Path) -> int:
        with MapsFile(path) as mf:
            return sum(r.attentions.shape[0] == TINY["depth"] for r in mf)

    assert run().records == 60
    args = ["checkpoint=random", f"input={fasta}", f"output={out}", *(f"{k}={v}" for k, v in opts.items())]
    return Finished("export_attention", out, args, run, read, 60, "protein_performer.analysis.export.run")


@pytest.fixture(scope="module")
def embed(work) -> Finished:
    fasta = _fasta(work / "embed.fasta", 600)
    out = work / "embed" / "embeddings.h5"
    opts = {"model_config": str(work / "tiny.yaml"), "crop": "start", "chunk": 8}

    def run(**kw):
        with one_thread():
            return run_embed("random", str(fasta), str(out), progress=False, **{**opts, **kw})

    def read(path: Path) -> int:
        emb = read_embeddings(path)
        assert np.isfinite(emb["mean"]).all()
        return len(emb["ids"])

    assert run().sequences == 600
    args = ["checkpoint=random", f"input={fasta}", f"output={out}", *(f"{k}={v}" for k, v in opts.items())]
    return Finished("embed", out, args, run, read, 600, "protein_performer.analysis.embed")


@pytest.fixture(scope="module")
def predict_contacts(work) -> Finished:
    """A checkpoint of the tiny model, a contact head made for it, 20 sequences with csv= and PNGs."""
    torch.manual_seed(0)
    ckpt = work / "tiny.ckpt"
    torch.save(
        {"state_dict": PerformerLM(PerformerConfig(**TINY)).state_dict(), "hyper_parameters": {"model": TINY}}, ckpt
    )
    n = TINY["depth"] * TINY["heads"]
    weights = np.random.default_rng(0).normal(size=n)
    head = ContactHead(2, 2, weights, -2.0, np.zeros(n), np.ones(n), checkpoint_sha256=file_sha256(ckpt))
    head_path = head.save(work / "contact_head.json")
    fasta = _fasta(work / "contacts.fasta", 20)
    out = work / "contacts" / "contacts.h5"
    csv_path, png_dir = work / "contacts" / "top.csv", work / "contacts" / "png"
    opts = {"csv_path": str(csv_path), "png_dir": str(png_dir), "crop": "start"}

    def run(**kw):
        with one_thread():
            return run_predict_contacts(
                str(ckpt), str(head_path), str(fasta), str(out), progress=False, **{**opts, **kw}
            )

    def read(path: Path) -> int:
        with ContactsFile(path) as cf:
            return sum(p.contacts.shape == (len(p.sequence),) * 2 for p in cf)

    assert run().records == 20 and len(list(png_dir.iterdir())) == 20
    args = [f"checkpoint={ckpt}", f"head={head_path}", f"input={fasta}", f"output={out}"]
    args += [f"csv={csv_path}", f"png_dir={png_dir}", "crop=start"]
    module = "protein_performer.analysis.contacts.predict"
    return Finished("predict_contacts", out, args, run, read, 20, module, [csv_path, png_dir])


def _kill(cmd: list[str], cwd: Path, partial: Path, size: int, delay: float | None = None) -> float | None:
    """Start ``cmd`` and SIGKILL it as soon as its partial file holds ``size`` bytes, or ``delay``
    s after the start if that comes first. Returns the seconds until the partial file appeared."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    appeared = None
    while proc.poll() is None and time.monotonic() - t0 < 300:
        if delay is not None and time.monotonic() - t0 >= delay:
            break
        with contextlib.suppress(OSError):
            written = partial.stat().st_size
            appeared = appeared or time.monotonic() - t0
            if written >= size:
                break
        time.sleep(0.002)
    assert proc.poll() is None, f"{cmd[2]} finished (exit {proc.returncode}) before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return appeared


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_killed_rerun_leaves_the_finished_output(command, request, work):
    done: Finished = request.getfixturevalue(command)
    before = done.snapshot()
    size = done.output.stat().st_size
    partial = done.output.with_name(done.output.name + ".partial")
    rng = random.Random(f"{SEED}:{command}")

    def check(when: str) -> None:
        assert done.snapshot() == before, f"{command}: the finished output changed (killed {when})"
        assert done.read(done.output) == done.records
        for p in done.leftovers():
            p.unlink()

    # while the new file is written: at random fractions of its size
    startup = []
    for frac in (rng.uniform(0.05, 0.8) for _ in range(2)):
        startup.append(_kill(done.cli(), work, partial, int(frac * size)))
        assert partial.exists()
        check(f"with {frac:.0%} of the new file written")
    # during the start-up (imports, model, input): a random moment before the partial file
    # appeared in the runs above (at the latest when it appears)
    delay = rng.random() * min(startup)
    _kill(done.cli(), work, partial, 1, delay)
    check(f"{delay:.2f} s after the start")


@pytest.mark.parametrize("command", COMMANDS)
def test_resume_over_a_finished_output_does_nothing(command, request, work, monkeypatch):
    done: Finished = request.getfixturevalue(command)
    before = done.snapshot()
    r = subprocess.run(done.cli("resume=true"), cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if "already complete" in line]
    assert said == [f"{done.output} is already complete ({done.records} records); nothing to do"], r.stdout
    assert done.snapshot() == before and not done.leftovers()

    # the library call: no model loaded, no input read, the summary read from the file
    def no_work(*a, **k):
        raise AssertionError("resume=true over a finished output loaded the model or read the input")

    monkeypatch.setattr(f"{done.module}.load_model", no_work)
    monkeypatch.setattr(f"{done.module}.read_sequences", no_work)
    summary = done.run(resume=True)
    assert summary.already_complete and summary.output == str(done.output)
    assert getattr(summary, "sequences" if command == "embed" else "records") == done.records
    assert done.snapshot() == before and not done.leftovers()


@pytest.mark.parametrize("command", COMMANDS)
def test_resume_with_other_settings_is_refused(command, request):
    done: Finished = request.getfixturevalue(command)
    before = done.snapshot()
    other = {"crop": "center"} if command != "embed" else {"crop": "center", "chunk": 16}
    differ = ", ".join(sorted(other))
    with pytest.raises(UserError) as e:
        done.run(resume=True, **other)
    assert str(e.value) == (
        f"{done.output}: is complete, but was made with other settings ({differ} differ); rerun "
        "without resume=true (or with overwrite=true) to replace it"
    )
    assert done.snapshot() == before and not done.leftovers()


def test_resume_refuses_a_finished_output_of_a_changed_input(export_attention):
    done = export_attention
    before = done.snapshot()
    fasta = Path(next(a for a in done.args if a.startswith("input=")).split("=", 1)[1])
    st = fasta.stat()
    os.utime(fasta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input was written again
    try:
        with pytest.raises(UserError, match=r"other settings \(input differ\)"):
            done.run(resume=True)
    finally:
        os.utime(fasta, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert done.snapshot() == before


def test_resume_writes_missing_side_outputs_from_the_finished_file(predict_contacts, monkeypatch):
    """A kill after the final rename, before ``csv=`` and the PNGs were written: ``resume=true``
    writes the missing ones from the finished file (no model), and leaves the rest as it was."""
    done = predict_contacts
    csv_path, png = done.extras[0], sorted(done.extras[1].iterdir())[-1]
    want = csv_path.read_bytes()
    before = {k: v for k, v in done.snapshot().items() if k not in (str(csv_path), str(png))}
    csv_path.unlink()
    png.unlink()
    monkeypatch.setattr(f"{done.module}.load_model", None)
    assert done.run(resume=True).already_complete
    assert csv_path.read_bytes() == want and png.stat().st_size > 0
    assert {k: v for k, v in done.snapshot().items() if k not in (str(csv_path), str(png))} == before
