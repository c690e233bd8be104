"""Reruns never destroy finished work (issue 18, item 3): the studies and the family-contacts recipe.

A rerun over a finished output, killed with a real SIGKILL at random moments (delays drawn with a
fixed seed), leaves the old files byte-identical; ``--resume`` / ``resume=true`` on a finished
output exits 0 and changes nothing; a plain rerun of the recipe over finished stages is refused.
The studies share their frame (``study_cli``): the cheapest one (``speed`` at a tiny size) is
killed, the frame's ``--resume`` is checked on ``speed``, ``redraw`` and a tagged ``compatibility``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from killing import command_env, kill_after

from protein_performer.cli.family_contacts import main as recipe_main
from protein_performer.studies import compatibility, redraw, speed, study_cli

REPO = Path(__file__).resolve().parents[2]
SEED = 20261207  # the kill delays


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every visible file under ``folder``: relative path -> (sha256, mtime_ns)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------ studies
TINY_SPEED = [
    "--cores",
    "favor_relu",
    "--min-length",
    "32",
    "--max-length",
    "32",
    "--dim",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--ff-dim",
    "16",
    "--nb-features",
    "8",
    "--reps",
    "1",
    "--in-process",
    "--threads",
    "1",
    "--no-progress",
]


def _speed_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "protein_performer.studies.speed", *TINY_SPEED, "--out-dir", str(out), *extra]


def _speed_in_process(out: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        speed.main([*TINY_SPEED, "--out-dir", str(out)])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_speed(tmp_path_factory) -> Path:
    """A finished tiny ``speed`` study (run in this process)."""
    out = tmp_path_factory.mktemp("speed") / "studies"
    _speed_in_process(out)
    assert sorted(p.name for p in out.iterdir()) == ["speed.json", "speed.png", "studies.md"]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


@pytest.mark.slow
def test_killed_study_rerun_leaves_the_previous_results(finished_speed, tmp_path):
    """The study's files are swapped into place at its very end, the JSON last: a kill before that
    leaves all of them byte-identical (mtimes too); a kill after the JSON's swap leaves the new
    complete set. Half the kills aim at the final writes (after the staged plot appears)."""
    out = _copy(finished_speed, tmp_path / "studies")
    old = _snapshot(out)
    rng = random.Random(SEED)
    kept = in_burst = 0
    for i in range(6):
        if i % 2 == 0:  # the final writes: from the staged plot's appearance to past the last swap
            delay = rng.uniform(0.0, 0.03)
            ready = lambda pid: (out / f".speed.{pid}.staged.png").exists()  # noqa: E731
        else:  # anywhere in the run (imports, the sweep, the writes)
            delay = rng.uniform(0.2, 2.0)
            ready = lambda pid: True  # noqa: E731
        kill_after(_speed_cmd(out), tmp_path, delay, ready)
        now = _snapshot(out)
        assert set(now) == set(old)
        changed = {k for k in now if now[k] != old[k]}
        if not changed:
            kept += 1
        elif "speed.json" in changed:  # past the last swap: a new complete result
            assert json.loads((out / "speed.json").read_text())["study"] == "speed"
            assert "speed.png" in changed and "<!-- /study:speed -->" in (out / "studies.md").read_text()
        else:  # inside the burst of swaps (well under a millisecond): the old bytes are the staged names'
            hidden = {hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob(".*") if p.is_file()}
            assert all(old[k][0] in hidden for k in changed), (i, delay, changed)
            in_burst += 1
        old = now
    assert kept >= 1 and in_burst <= 1, (kept, in_burst)
    _speed_in_process(out)  # a finished rerun removes what the killed ones left
    assert sorted(p.name for p in out.iterdir()) == ["speed.json", "speed.png", "studies.md"]


def test_study_resume_on_a_finished_result_changes_nothing(finished_speed, tmp_path):
    out = _copy(finished_speed, tmp_path / "studies")
    before = _snapshot(out)
    res = subprocess.run(
        _speed_cmd(out, "--resume"), cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "is complete" in res.stderr
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    # other settings: an error that says how to replace it; nothing changed
    res = subprocess.run(
        _speed_cmd(out, "--resume", "--reps", "2"), cwd=tmp_path, env=command_env(), capture_output=True, text=True
    )
    assert res.returncode == 1 and "reps: 1 -> 2" in res.stderr and "rerun without --resume" in res.stderr
    assert _snapshot(out) == before


class _Ran(Exception):
    """Raised by the stub of a study's ``run``: main got past its start."""


@pytest.mark.parametrize(
    "module, argv, name", [(redraw, [], "redraw"), (compatibility, ["--tag", "_t"], "compatibility_t")]
)
def test_resume_is_the_frames(module, argv, name, tmp_path, monkeypatch):
    """Every study's ``main`` starts with ``study_args``: ``--resume`` skips a finished run of the
    same settings (``<study><tag>.json``) without calling ``run``, and runs one when there is none."""
    argv = [*argv, "--out-dir", str(tmp_path)]

    def run(args):
        raise _Ran

    monkeypatch.setattr(module, "run", run)
    with pytest.raises(_Ran):  # nothing finished: the study runs
        module.main([*argv, "--resume"])
    args = module.parse_args(argv)
    args.command = "python -m ..."
    (tmp_path / f"{name}.json").write_text(json.dumps(study_cli.study_record(name, args, {"cpu": "x"})))
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--resume"])
    assert exit_info.value.code == 0 and _snapshot(tmp_path) == before
    with pytest.raises(SystemExit, match="other settings.*threads: 2 -> 3.*rerun without --resume"):
        module.main([*argv, "--resume", "--threads", "3"])
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------- family contacts
FAMILY = "PF00226"
RECIPE_STAGES = "extract,ingest,train,export,score"  # contacts (every kortemme40 chain) left out: time
TINY_RECIPE = [
    "max_sequences=60",
    "trainer.max_steps=2",
    "trainer.max_time=null",
    "model.depth=1",
    "model.dim=16",
    "model.dim_head=8",
    "model.ff_dim=32",
    "model.nb_features=8",
    "data.batch_size=8",
    "module.warmup_steps=0",
    "num_threads=1",
]


def _recipe_args(shared_data: Path, out: Path, *extra: str, stages: str = RECIPE_STAGES) -> list[str]:
    return [
        f"family={FAMILY}",
        f"output_dir={out}",
        f"input={shared_data / 'pfam40_domains.fasta.gz'}",
        f"structures={shared_data / 'structures' / 'kortemme40'}",
        f"stages={stages}",
        *TINY_RECIPE,
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_recipe(shared_data, tmp_path_factory) -> tuple[Path, dict]:
    """A finished tiny recipe (in this process), made in two parts: extract, ingest and train; then
    ``resume=true`` for all five stages, which runs only export and score."""
    out = tmp_path_factory.mktemp("recipe") / FAMILY
    recipe_main(_recipe_args(shared_data, out, stages="extract,ingest,train"))
    first = {"seconds": json.loads((out / "summary.json").read_text())["seconds"], "files": _snapshot(out)}
    (out / "run.log").write_text("a file the recipe does not write\n")
    recipe_main(_recipe_args(shared_data, out, "resume=true"))
    return out, first


@pytest.mark.slow
def test_recipe_resume_runs_only_the_stages_not_done(finished_recipe):
    out, first = finished_recipe
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["seconds"]) == ["extract", "ingest", "train", "export", "score"]
    assert {k: summary["seconds"][k] for k in first["seconds"]} == first["seconds"]
    now = _snapshot(out)
    assert {k: now[k] for k in ("family.fasta", "checkpoints/last.ckpt")} == {
        k: first["files"][k] for k in ("family.fasta", "checkpoints/last.ckpt")
    }
    assert "headline" in summary and (out / "maps.h5").is_file() and (out / "contacts.png").is_file()


@pytest.mark.slow
def test_recipe_plain_rerun_is_refused_and_resume_changes_nothing(finished_recipe, shared_data, tmp_path, capsys):
    out = _copy(finished_recipe[0], tmp_path / FAMILY)
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(_recipe_args(shared_data, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "already holds a finished run" in err and "resume=true" in err and "overwrite=true" in err
    assert _snapshot(out) == before
    recipe_main(_recipe_args(shared_data, out, "resume=true"))  # returns: exit code 0
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == [FAMILY]
    with pytest.raises(SystemExit):  # resume with other settings: refused, naming overwrite=true
        recipe_main(_recipe_args(shared_data, out, "resume=true", "model.dim=32"))
    assert "other settings" in capsys.readouterr().err and _snapshot(out) == before


@pytest.mark.slow
def test_killed_recipe_overwrite_leaves_the_finished_run(finished_recipe, shared_data, tmp_path):
    out = _copy(finished_recipe[0], tmp_path / FAMILY)
    old = _snapshot(out)
    cmd = [sys.executable, "-m", "protein_performer.family_contacts"]
    cmd += _recipe_args(shared_data, out, "overwrite=true")
    rng = random.Random(SEED + 1)
    inode, kept = out.stat().st_ino, 0
    # the kills come a random instant after a file of the new run appears in its staging folder:
    # the extracted FASTA, the shards (both before training), the export, the plot (next to the swap)
    for marker in ("family.fasta", "shards/manifest.json", "maps_random.h5", "contacts.png"):
        delay = rng.uniform(0.0, 0.3)
        kill_after(cmd, tmp_path, delay, lambda pid, m=marker: (tmp_path / f".{FAMILY}.staging-{pid}" / m).exists())
        now = _snapshot(out)
        if out.stat().st_ino == inode:  # not swapped yet: the finished run, byte for byte (mtimes too)
            assert now == old, delay
            kept += 1
        else:  # killed after the swap: the new run is complete (the file the recipe does not write is
            # moved over right after the swap: killed in between, it waits in the old folder for the next run)
            summary = json.loads((out / "summary.json").read_text())
            assert list(summary["seconds"]) == RECIPE_STAGES.split(",")
            assert set(now) | {"run.log"} >= set(old)
            assert "run.log" in now or list(tmp_path.glob(f".{FAMILY}.staging-*/run.log"))
            inode, old = out.stat().st_ino, now
    assert kept >= 2
    # a finished overwrite: the new run in place, the file the recipe does not own kept, nothing left beside
    recipe_main(_recipe_args(shared_data, out, "overwrite=true"))
    assert out.stat().st_ino != inode and (out / "run.log").read_text() == "a file the recipe does not write\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAMILY]
    assert set(_snapshot(out)) == set(old)
