"""The train command on bad input: a checkpoint of another model shape, a truncated or foreign
checkpoint, a missing one, a data root that is a file. Each is one line naming the file and what
to do, exit code 1 on the command line, and nothing already written is touched."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from hydra import compose, initialize_config_dir

from protein_performer.errors import IncompleteOutputError, UserError
from protein_performer.training.checkpoint_io import AtomicCheckpointIO, CheckpointError, atomic_link
from protein_performer.training.train import train

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
TINY = tiny_overrides(
    "data.eval_splits=[valid]",
    "trainer.max_time=null",
    "trainer.limit_val_batches=0",
    "callbacks.checkpoint.every_n_train_steps=1",
    "~logger",
    "validate=false",
    "test=false",
    "num_threads=1",
    "trainer.max_steps=2",
)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory, repo_root) -> Path:
    from protein_performer.data.ingest import ingest

    out = tmp_path_factory.mktemp("shards")
    ingest(input=str(repo_root / "data" / "uniprot_sample.fasta.gz"), output_dir=str(out), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(shard_root, tmp_path_factory) -> Path:
    """A finished 2-step run of the tiny model (dim 32): its run folder."""
    run_dir = tmp_path_factory.mktemp("run")
    train(_cfg(shard_root, run_dir))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    return run_dir


def _cfg(shard_root: Path, run_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, f"data.root={shard_root}", f"run_dir={run_dir}", *extra])


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and modification time (ns)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def test_resume_with_another_model_shape_is_refused_and_touches_nothing(shard_root, trained):
    before = _snapshot(trained)
    last = trained / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as e:
        train(_cfg(shard_root, trained, "model.dim=48", "ckpt_path=last"))
    msg = _one_line(e.value)
    assert str(last) in msg and "another model shape" in msg
    assert "model.token_emb.weight is 29x32 in the checkpoint but 29x48 in this model" in msg
    assert "model.dim=32 (now 48)" in msg and "start a new run" in msg
    assert _snapshot(trained) == before


def test_checkpoint_of_another_shape_into_a_new_run_writes_nothing(shard_root, trained, tmp_path):
    ckpt = trained / "checkpoints" / "step0000002.ckpt"
    with pytest.raises(CheckpointError, match=r"model\.depth=2 \(now 3\)"):
        train(_cfg(shard_root, tmp_path / "new", "model.depth=3", f"ckpt_path={ckpt}"))
    assert not (tmp_path / "new" / "checkpoints").exists() and not (tmp_path / "new" / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_torn_checkpoint_is_one_clear_line(shard_root, trained, tmp_path, damage):
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * 64}[damage])
    with pytest.raises(IncompleteOutputError) as e:
        train(_cfg(shard_root, tmp_path / "run", f"ckpt_path={torn}"))
    msg = _one_line(e.value)
    assert msg.startswith(f"{torn}: not a complete checkpoint") and "ckpt_path=<file>" in msg
    with pytest.raises(IncompleteOutputError, match="not a complete checkpoint"):  # also Lightning's own reader
        AtomicCheckpointIO().load_checkpoint(torn)


def test_foreign_or_missing_checkpoint(shard_root, tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train(_cfg(shard_root, tmp_path / "run", f"ckpt_path={foreign}"))
    with pytest.raises(UserError, match="no such checkpoint"):
        train(_cfg(shard_root, tmp_path / "run", f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    with pytest.raises(UserError, match="is a folder, but a checkpoint file is expected"):
        train(_cfg(shard_root, tmp_path / "run", f"ckpt_path={tmp_path}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_last_link_is_replaced_atomically(tmp_path, shard_root):
    a, b, link = tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "last.ckpt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    atomic_link(a, link)
    assert link.is_symlink() and link.read_bytes() == b"a"
    atomic_link(b, link)
    assert os.readlink(link) == "b.ckpt" and link.read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt", "last.ckpt"]
    # through the trainer: save_last=link points last.ckpt at the newest step checkpoint
    run = tmp_path / "run"
    train(_cfg(shard_root, run, "callbacks.checkpoint.save_last=link"))
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step0000002.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2


@pytest.mark.parametrize("case", ["other_shape", "data_root_is_a_file", "disk_full"])
def test_train_command_prints_one_line_and_exits_1(shard_root, trained, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    before = _snapshot(run)
    extra = {
        "other_shape": ["model.dim=48", "ckpt_path=last", f"data.root={shard_root}"],
        "data_root_is_a_file": [f"data.root={shard_root / 'manifest.json'}"],
        "disk_full": ["ckpt_path=last", "trainer.max_steps=4", f"data.root={shard_root}"],
    }[case]
    cmd = [sys.executable, "-m", "protein_performer.train", *TINY, f"hydra.run.dir={run}", *extra]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("PROTEIN_PERFORMER_TRACEBACK", None)
    limit = None
    if case == "disk_full":  # a file size limit below one checkpoint: the save at step 3 fails (EFBIG)
        import resource

        size = (run / "checkpoints" / "last.ckpt").stat().st_size
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))  # noqa: E731
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    if case == "other_shape":
        assert str(run / "checkpoints" / "last.ckpt") in errors[0] and "model.dim=32 (now 48)" in errors[0]
    elif case == "data_root_is_a_file":
        assert str(shard_root / "manifest.json") in errors[0]
    else:
        assert errors[0].startswith(f"error: {run / 'checkpoints' / 'step0000003.ckpt'}: no space left")
    assert {k: v for k, v in _snapshot(run).items() if k.startswith("checkpoints")} == before


def test_resume_without_a_checkpoint_says_how_to_point_at_the_run(shard_root, tmp_path, caplog):
    """ckpt_path=last in a folder with no last.ckpt (under hydra.main, a new timestamped folder unless
    hydra.run.dir is given) starts afresh, and says so with the setting that resumes."""
    import logging

    with caplog.at_level(logging.WARNING, logger="protein_performer.training.train"):
        metrics = train(_cfg(shard_root, tmp_path / "fresh", "ckpt_path=last"))
    assert metrics["global_step"] == 2
    assert any(
        "does not exist: starting from scratch" in r.getMessage() and "hydra.run.dir=" in r.getMessage()
        for r in caplog.records
    )
