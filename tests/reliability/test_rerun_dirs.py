"""Finished work is never destroyed by a rerun (issue 18, item 3), for the commands that write a
folder: ``ingest``, ``contacts`` and ``aa_similarity``.

- A rerun killed with SIGKILL at random moments (delays drawn with a fixed seed over the run's
  measured duration) leaves the finished output byte-identical (same bytes and times) and
  readable, or, if the kill came after the new output was swapped in, a complete new one.
- ``resume=true`` on a finished output exits 0, says it is complete and changes nothing; with
  other inputs or options it is refused, naming what differs.
- ``ingest`` refuses a plain rerun over a finished ingest (naming ``resume=true`` and
  ``overwrite=true``); ``overwrite=true`` stages the new ingest beside it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from killing import contents, kill_after, leftovers, module_cmd, run_cmd, snapshot, staging, timed_run

from protein_performer.analysis.aa_similarity import run_aa_similarity
from protein_performer.analysis.contacts import run_contacts
from protein_performer.analysis.maps import write_maps
from protein_performer.analysis.structures import load_structures
from protein_performer.data.ingest import IngestError, ingest
from protein_performer.data.shards import read_manifest
from protein_performer.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "uniprot_sample.fasta.gz"
STRUCTURES = REPO / "data" / "structures" / "biopython"
SEED = 20261207  # the kill delays


# ---------------------------------------------------------------------------------------------- ingest
@pytest.fixture(scope="module")
def finished_ingest(tmp_path_factory):
    work = tmp_path_factory.mktemp("rerun_ingest")
    out = work / "shards"
    ingest(input=str(SAMPLE), output_dir=str(out), progress=False)
    (out / "notes.txt").write_text("a user's file in the output folder\n")
    return work, out


def _ingest_cmd(out: Path, *extra: str) -> list[str]:
    return module_cmd("ingest", f"input={SAMPLE}", f"output_dir={out}", "progress=false", *extra)


def test_ingest_rerun_over_a_finished_ingest_is_refused_and_resume_is_a_no_op(finished_ingest):
    work, out = finished_ingest
    before = snapshot(out)
    n = read_manifest(out)["n_unique"]
    with pytest.raises(
        IngestError, match=rf"{out} holds a finished ingest \({n} sequences.*resume=true.*overwrite=true"
    ):
        ingest(input=str(SAMPLE), output_dir=str(out), progress=False)
    with pytest.raises(IngestError, match=r"made with a different config \(differs in: seed\): refusing to replace it"):
        ingest(input=str(SAMPLE), output_dir=str(out), progress=False, seed=1)
    with pytest.raises(IngestError, match="from one part of a parallel ingest"):
        ingest(input=str(SAMPLE), output_dir=str(out), progress=False, part=0, num_parts=1, overwrite=True)
    res = run_cmd(_ingest_cmd(out, "resume=true"), work)
    assert res.returncode == 0, res.stderr
    assert f"resume=true: {out} is already complete" in res.stdout + res.stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_ingest_overwrite_killed_at_random_moments_keeps_the_finished_ingest(finished_ingest):
    work, out = finished_ingest
    before = snapshot(out)
    cmd = _ingest_cmd(out, "overwrite=true")
    ref = work / "ref"  # an uninterrupted overwrite rerun, to time it
    ref.mkdir()
    duration = timed_run(_ingest_cmd(ref / "shards"), work)
    rng = random.Random(SEED)
    untouched = 0
    kills = [(rng.uniform(0.05, 0.6) * duration, None) for _ in range(2)] + [(rng.uniform(0, 0.2), staging(out))]
    for delay, started in kills:
        for _ in range(4):  # a rerun that finished before its kill (faster than the timed one): again, earlier
            killed = kill_after(cmd, work, delay, started)
            now = snapshot(out)
            # the ingest's bytes do not depend on threads or the process (integers, gzip): even a
            # kill after the swap leaves the same bytes; the times tell whether the old files are untouched
            assert contents(now) == contents(before)
            read_manifest(out)  # readable, complete
            untouched += killed and now == before
            before, delay = now, delay / 2
            if killed or started is not None:
                break
    assert untouched >= 2, "the kills did not land during the reruns"
    res = run_cmd(cmd, work)  # a finished overwrite: the hidden leftovers of the killed ones are gone
    assert res.returncode == 0, res.stderr
    assert contents(snapshot(out)) == contents(before) and leftovers(out) == []
    assert (out / "notes.txt").read_text() == "a user's file in the output folder\n"


# ------------------------------------------------------------------------------ contacts / aa_similarity
@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """A maps file for the 8 structures of data/ (noise maps: the contact numbers do not matter)."""
    work = tmp_path_factory.mktemp("rerun_analysis")
    chains, _ = load_structures(STRUCTURES)
    rng = np.random.default_rng(0)
    recs = []
    for c in chains:
        a = rng.random((2, 2, len(c.sequence), len(c.sequence)))
        recs.append(dict(id=c.name, sequence=c.sequence, source=c.key, attentions=a / a.sum(-1, keepdims=True)))
    write_maps(work / "maps.h5", recs, apc=True)
    return work, work / "maps.h5"


COMMANDS = {
    # command: (options, the last one changed by the killed reruns, the report)
    "contacts": (
        [f"structures={STRUCTURES}", "n_folds=2", "n_plots=2"],
        "n_plots=3",
        "report.json",
    ),
    "aa_similarity": (["max_sequences=6"], "max_sequences=5", "aa_similarity.json"),
}


def _option_of(report: Path, command: str):
    options = json.loads(report.read_text())["inputs"]["options"]
    return options["n_plots"] if command == "contacts" else options["max_sequences"]


def _run_in_process(command: str, maps_h5: Path, out: Path, changed: str, resume: bool = False) -> dict:
    """The library call behind ``command`` with its test options and ``changed`` (``key=value``)."""
    key, _, value = changed.partition("=")
    if command == "contacts":
        return run_contacts(maps_h5, STRUCTURES, out, n_folds=2, **{key: int(value)}, resume=resume)
    return run_aa_similarity(maps_h5, out, **{key: int(value)}, resume=resume)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_analysis_rerun_killed_at_random_moments_keeps_the_finished_output(command, maps):
    work, maps_h5 = maps
    options, changed, report = COMMANDS[command]
    out = work / command
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")

    def cmd(*extra):
        return module_cmd(command, f"maps={maps_h5}", f"output_dir={out}", *options, *extra)

    duration = timed_run(cmd(), work)
    before = snapshot(out)
    old_option = _option_of(out / report, command)

    # resume=true: complete, nothing done; other options: refused, nothing done
    res = run_cmd(cmd("resume=true"), work)
    assert res.returncode == 0 and "is already complete" in res.stdout + res.stderr, res.stderr
    with pytest.raises(UserError) as refused:  # in this process: the same call the command makes
        _run_in_process(command, maps_h5, out, changed, resume=True)
    assert str(refused.value).startswith(f"{out / report}: a finished {command} run with other inputs or settings")
    assert str(refused.value).endswith("(options differ); rerun without resume=true to replace it")
    assert snapshot(out) == before

    rng = random.Random(SEED)
    intact = 0
    # a kill at a random moment of the rerun, one while it writes its new output (staging)
    kills = [(rng.uniform(0.05, 0.6) * duration, None), (rng.uniform(0, 0.2), staging(out))]
    for delay, started in kills:
        for _ in range(4):  # a rerun that finished before its kill (faster than the timed one): again, earlier
            # each rerun asks for the option the output does not have, so a swapped-in output shows
            rerun = changed if _option_of(out / report, command) == old_option else options[-1]
            killed = kill_after(cmd(rerun), work, delay, started)
            now = snapshot(out)
            if now == before:
                intact += 1
            else:  # the kill came after the swap: a complete new output, the user's file kept
                assert f"{_option_of(out / report, command)}" == rerun.partition("=")[2]
                before = now
            assert (out / "notes.txt").read_text() == "kept\n"
            json.loads((out / report).read_text())  # readable
            delay /= 2
            if killed or started is not None:
                break
    assert intact >= 1, "the kills came too late: they must land while the rerun works"
    _run_in_process(command, maps_h5, out, changed)  # a finished rerun removes the killed ones' stages
    assert _option_of(out / report, command) != old_option and leftovers(out) == []
    assert (out / "notes.txt").read_text() == "kept\n"


def test_analysis_output_dir_that_holds_the_working_directory_is_refused(maps, monkeypatch):
    work, maps_h5 = maps
    monkeypatch.chdir(work)
    with pytest.raises(UserError, match=r"output_dir=\. is the working directory \(or holds it\)"):
        run_aa_similarity(maps_h5, ".", max_sequences=2)
