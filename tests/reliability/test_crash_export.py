"""Crashes leave nothing that looks complete (issue 10, item 3): export_attention, contacts and
aa_similarity killed with a real SIGKILL at random moments (drawn with a fixed seed).

export_attention: the kill leaves ``<output>.partial`` (+ journal) that every reader refuses, a
plain rerun refuses to touch, and ``resume=true`` turns into a file byte-identical to an
uninterrupted export. contacts / aa_similarity: no report JSON unless the run finished (and
then it equals the uninterrupted run's), no truncated file under a final name.

Outputs compared byte for byte come from the same kind of process with the same thread count: the
killed, resumed and uninterrupted (reference) runs are the command line in subprocesses of one
environment (one thread); the overwrite test's two exports both run in this process. Floats summed
in another kind of process (another BLAS / OpenMP thread count, other global state such as the
float32 matmul precision an in-process ``train()`` leaves, or another version of the code while
files are being edited) may differ in their last bits, and a printed digit with them.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from killing import command_env, kill_after, run_cmd

from protein_performer.analysis.export import ExportError, run_export
from protein_performer.analysis.maps import MapsFile, write_maps
from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence, load_structures
from protein_performer.errors import IncompleteOutputError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "swissprot_sample.fasta.gz"
STRUCTURES = REPO / "data" / "structures" / "biopython"
SEED = 20261130  # the kill delays
TINY = """vocab_size: 29
max_len: 96
dim: 32
depth: 2
heads: 2
dim_head: 16
ff_dim: 64
attention: favor_relu
nb_features: 16
causal: false
"""
N_SEQUENCES = 100  # ~1 s of export on one thread, after ~2 s of imports (kills are placed by record)
KEPT = re.compile(r"\((\d+) kept from the interrupted export\)")  # the command's summary line


def _export_cmd(work: Path, output: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "protein_performer.export_attention",
        "checkpoint=random",
        f"model_config={work / 'tiny.yaml'}",
        f"input={SAMPLE}",
        f"output={output}",
        "crop=start",
        f"max_sequences={N_SEQUENCES}",
        "num_threads=1",
        "progress=false",
        *extra,
    ]


def _journaled(journal: Path) -> int:
    """How many records an export's journal lists (its first line holds the settings)."""
    try:
        return max(0, journal.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def _kept(stdout: str) -> int:
    """The records a resumed export kept from the interrupted one, from its summary line."""
    m = KEPT.search(stdout)
    return int(m.group(1)) if m else 0


def _export_in_process(work: Path, output: Path, **kw):
    """The same export in this process (torch already imported: seconds saved per run), for the
    refusals (which write nothing) and for outputs compared with another export of this process."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_export(
            "random",
            str(SAMPLE),
            str(output),
            model_config=str(work / "tiny.yaml"),
            crop="start",
            max_sequences=N_SEQUENCES,
            progress=False,
            **kw,
        )
    finally:
        torch.set_num_threads(n)


class _Reference:
    """An uninterrupted export by the command line, in a subprocess with the environment of the runs
    it is compared with; it runs in the background while they start (``path`` waits for it)."""

    def __init__(self, work: Path):
        self.work, self.out = work, work / "ref" / "maps.h5"
        self.log = work / "ref.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                _export_cmd(work, str(self.out)), cwd=work, env=command_env(), stdout=log, stderr=subprocess.STDOUT
            )

    def path(self) -> Path:
        assert self.proc.wait(timeout=300) == 0, self.log.read_text()[-3000:]
        return self.out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("crash_export")
    (work / "tiny.yaml").write_text(TINY)
    ref = _Reference(work)
    yield ref
    if ref.proc.poll() is None:  # a test failed before it waited
        ref.proc.kill()
        ref.proc.wait()


def _assert_nothing_looks_complete(out: Path, ref: _Reference) -> None:
    """After a kill: ``out`` is absent (or the finished file, identical to the reference), and a
    partial file is refused by the reader."""
    if out.exists():  # the run finished before the kill
        assert out.read_bytes() == ref.path().read_bytes()
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        with pytest.raises(IncompleteOutputError, match=r"incomplete: the export was interrupted.*resume=true"):
            MapsFile(partial)
        try:  # readable HDF5 (killed after a flush): it carries the marker every reader checks
            with h5py.File(partial, "r") as h5:
                assert "incomplete" in h5.attrs
        except OSError:
            pass  # killed before HDF5 wrote its first metadata: not even HDF5


def _finish_resume(name: str, out: Path, proc: subprocess.Popen, ref: _Reference) -> int:
    """Wait for a ``resume=true`` run: byte-identical to the uninterrupted export, nothing partial
    left. Returns how many records it kept from the interrupted one."""
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert out.read_bytes() == ref.path().read_bytes(), f"{name}: resumed export differs from the uninterrupted one"
    partial = out.with_name("maps.h5.partial")
    assert not partial.exists() and not partial.with_name("maps.h5.partial.journal").exists()
    with MapsFile(out) as mf:
        assert len(mf) == N_SEQUENCES
    return _kept(stdout)


@pytest.mark.slow
def test_export_killed_at_random_moments_resumes_to_a_byte_identical_file(reference):
    work = reference.work
    rng = random.Random(SEED)
    # kills at random moments of the export: after a seeded number of records, plus a seeded part
    # of a record's time (~10 ms each), so they land inside the work whatever the machine's speed
    cases = [(f"export{k}", rng.randint(5, N_SEQUENCES - 10), rng.uniform(0.0, 0.02)) for k in range(3)]
    resumed, running = [], None  # a resume runs while the next export is started and killed
    for name, records, delay in cases:
        out = work / name / "maps.h5"
        journal = out.with_name("maps.h5.partial.journal")
        killed = kill_after(
            _export_cmd(work, str(out)), work, delay, lambda pid, j=journal, n=records: _journaled(j) >= n
        )
        _assert_nothing_looks_complete(out, reference)
        partial = out.with_name("maps.h5.partial")
        if killed and partial.exists() and name == "export0":
            before = partial.read_bytes()
            with pytest.raises(ExportError) as e:  # no resume: refused, partial untouched
                _export_in_process(work, out)
            assert str(e.value) == (
                f"{partial}: an interrupted export of {out} is there; rerun "
                "with resume=true to continue it, or overwrite=true to start again"
            )
            assert partial.read_bytes() == before and not out.exists()
        if name == "export1" and partial.exists():
            # also damage the interrupted file (flip bytes in its last quarter): resume must notice
            # (per-record CRC-32s) and recompute from the first damaged record, still identical
            data = bytearray(partial.read_bytes())
            at = len(data) * 3 // 4
            data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
            partial.write_bytes(bytes(data))
        if running is not None:
            resumed.append(_finish_resume(*running, reference))
        cmd = _export_cmd(work, str(out), "resume=true")
        running = (
            name,
            out,
            subprocess.Popen(
                cmd, cwd=work, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
    resumed.append(_finish_resume(*running, reference))
    assert sum(0 < r < N_SEQUENCES for r in resumed) >= 2, f"the kills did not land mid-export: {resumed}"


def _write_and_kill_self(path: Path, n_records: int) -> None:
    """A writer process that adds records, flushes, and is SIGKILLed before it finishes."""
    code = (
        "import os, signal, numpy as np\n"
        "from protein_performer.analysis.maps import MapsWriter\n"
        f"w = MapsWriter({str(path)!r})\n"
        f"for n in range({n_records}):\n"
        "    w.add(f'r{n}', 'ACDEFGHIKLMNPQRSTVWY', np.full((1, 2, 20, 20), 0.05))\n"
        "w.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=command_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL


def test_every_reader_refuses_a_maps_file_whose_writer_was_killed(tmp_path):
    maps = tmp_path / "maps.h5"
    _write_and_kill_self(maps, 3)
    with h5py.File(maps, "r") as h5:  # plain HDF5 sees 3 records: without the marker they would pass
        assert len(h5.keys()) == 3 and "incomplete" in h5.attrs
    with pytest.raises(IncompleteOutputError, match=rf"{maps}: incomplete: the export was interrupted"):
        MapsFile(maps)
    for cmd in (
        ["protein_performer.contacts", f"maps={maps}", f"structures={STRUCTURES}", f"output_dir={tmp_path / 'c'}"],
        ["protein_performer.aa_similarity", f"maps={maps}", f"output_dir={tmp_path / 'a'}"],
    ):
        res = run_cmd([sys.executable, "-m", *cmd], tmp_path)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert res.stderr.startswith(f"error: {maps}: incomplete: the export was interrupted")
        assert "resume=true" in res.stderr


def test_maps_files_written_before_the_marker_stay_readable(tmp_path):
    """Complete files of the old writer carry neither ``incomplete`` nor ``vocab``: still read."""
    new = tmp_path / "new.h5"
    write_maps(new, [dict(id="a", sequence="ACDEFGHIK", attentions=np.full((1, 1, 9, 9), 1 / 9))])
    old = tmp_path / "old.h5"
    with h5py.File(new, "r") as src, h5py.File(old, "w", track_order=True) as dst:
        for k in ("format_version", "model_config", "checkpoint_sha256", "causal"):
            dst.attrs[k] = src.attrs[k]
        src.copy("a", dst)
    with MapsFile(old) as mf:
        rec = mf["a"]
        assert rec.sequence == "ACDEFGHIK" and np.allclose(rec.attentions, 1 / 9, rtol=2**-11)


# ------------------------------------------------------------------------------ contacts / aa_similarity
@pytest.fixture(scope="module")
def control_maps(tmp_path_factory):
    """maps.h5 for the repo's 8 structures (distance-based maps, no model): contacts has >= 2 proteins."""
    work = tmp_path_factory.mktemp("crash_analysis")
    chains, _ = load_structures(STRUCTURES)
    rng = np.random.default_rng(0)
    recs = []
    for c in chains:
        xyz = coords_on_sequence(c, align_to_sequence(c, c.sequence))
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
        a = np.exp(-np.nan_to_num(d, nan=50.0) / 4.0)[None, None] + rng.random((2, 2, len(d), len(d))) * 0.1
        recs.append(dict(id=c.name, sequence=c.sequence, source=c.key, attentions=a / a.sum(-1, keepdims=True)))
    write_maps(work / "maps.h5", recs, apc=True)
    return work, work / "maps.h5"


def _png_complete(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


def _check_output_dir(out: Path, ref: Path, report: str) -> None:
    """No final-named file is truncated, and the JSON report is there only if the run finished."""
    if not out.exists():
        return
    visible = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix != ".log"]
    for p in visible:
        assert not p.name.endswith(".partial"), p
        if p.suffix == ".png":
            assert _png_complete(p), f"{p}: truncated PNG under its final name"
        else:
            assert p.read_bytes() == (ref / p.relative_to(out)).read_bytes(), f"{p}: differs from a full run"
    if (out / report).exists():  # written last: everything of the run is there
        assert sorted(p.relative_to(out) for p in visible) == sorted(
            p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and p.suffix != ".log"
        )


@pytest.mark.slow
@pytest.mark.parametrize("command", ["contacts", "aa_similarity"])
def test_analysis_killed_at_random_moments_leaves_no_report(command, control_maps):
    work, maps = control_maps
    args = {"contacts": [f"structures={STRUCTURES}", "n_folds=2", "n_plots=3"], "aa_similarity": []}[command]
    report = {"contacts": "report.json", "aa_similarity": "aa_similarity.json"}[command]

    def cmd(out):
        return [sys.executable, "-m", f"protein_performer.{command}", f"maps={maps}", f"output_dir={out}", *args]

    # the reference: the same command, in a subprocess with the same environment as the killed runs.
    # Computed in this process instead (another BLAS thread count, other global state), a sum could
    # round differently in its last bit and a printed digit of the JSON differ from a full run's.
    ref = work / f"{command}_ref"
    t0 = time.monotonic()
    res = run_cmd(cmd(ref), work)
    duration = time.monotonic() - t0  # start-up (imports) included, as for the killed runs
    assert res.returncode == 0, res.stderr[-3000:]
    ref_report = json.loads((ref / report).read_text())
    # a kill while the outputs are being written (right after the first one appears), over an old
    # complete report: it is removed before the new files are written, never mixed with them. It needs
    # no timing: it runs beside the kills at random moments below.
    first_file = {"contacts": "report.csv", "aa_similarity": "aa_similarity.csv"}[command]
    writing = work / f"{command}_writing"
    writing.mkdir()
    (writing / report).write_text(json.dumps(ref_report))
    beside = threading.Thread(target=kill_after, args=(cmd(writing), work, 0.0, writing / first_file))
    beside.start()
    rng = random.Random(SEED)
    for k, delay in enumerate([rng.uniform(0.3, 1.0) * duration for _ in range(2)]):
        out = work / f"{command}_{k}"
        kill_after(cmd(out), work, delay)
        _check_output_dir(out, ref, report)
    beside.join(timeout=300)
    _check_output_dir(writing, ref, report)
    assert not (writing / report).exists() or json.loads((writing / report).read_text()) == ref_report


def test_overwrite_discards_an_interrupted_export_and_resume_checks_the_settings(tmp_path):
    work = tmp_path
    (work / "tiny.yaml").write_text(TINY)
    # every export here runs in this process, one thread: the overwrite and its reference alike
    ref = _export_in_process(work, work / "ref" / "maps.h5").output
    out = tmp_path / "maps.h5"
    partial = tmp_path / "maps.h5.partial"
    journal = tmp_path / "maps.h5.partial.journal"
    partial.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # what a kill before HDF5's first flush leaves
    journal.write_text(json.dumps({"journal": 1, "settings": {"meta": {"crop": "center"}}}) + "\n")
    with pytest.raises(
        ExportError,
        match=r"maps\.h5\.partial: the interrupted export ran with other settings "
        r"\(checkpoint_sha256, input, meta, model_config differ\); rerun with the "
        r"same settings and resume=true, or with overwrite=true",
    ):
        _export_in_process(work, out, resume=True)
    assert partial.read_bytes().endswith(b"\0" * 100) and not out.exists()
    summary = _export_in_process(work, out, overwrite=True)
    assert summary.records == N_SEQUENCES and summary.resumed_records == 0
    assert out.read_bytes() == Path(ref).read_bytes() and not partial.exists() and not journal.exists()
