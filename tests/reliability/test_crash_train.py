"""Training under real SIGKILLs: checkpoints are never torn, and ``ckpt_path=last`` after a kill at
any moment continues with exactly the loss curve of an uninterrupted run.

Every kill here is a real ``SIGKILL`` of a real subprocess at a moment drawn from a seeded random
generator; nothing is mocked.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from protein_performer.training.checkpoint_io import load_checkpoint_file, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="1")

# ------------------------------------------------------------------ the writer alone, killed mid-write
WRITER = textwrap.dedent("""
    import sys, torch
    from protein_performer.training.checkpoint_io import atomic_torch_save
    mode, path = sys.argv[1], sys.argv[2]
    big = [torch.full((4_000_000,), float(k)) for k in (1, 2)]  # 16 MB each: most of the time is spent writing
    i = 0
    while True:
        obj = {"state_dict": {"w": big[i % 2]}, "version": i % 2 + 1}
        if mode == "atomic":
            atomic_torch_save(obj, path)
        else:
            torch.save(obj, path)  # in place, as a plain writer does
        print("saved", i, flush=True)
        i += 1
""")


def _kill_writer(mode: str, path: Path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, mode, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("saved"), "the writer did not save once"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _complete(path: Path) -> bool:
    try:
        ckpt = load_checkpoint_file(path)
    except Exception:
        return False
    w = ckpt["state_dict"]["w"]
    return bool(torch.all(w == float(ckpt["version"])))  # one whole version, never a mix


@pytest.mark.slow
def test_atomic_save_survives_sigkill_and_in_place_save_does_not(tmp_path):
    rng = random.Random(7)
    delays = [rng.uniform(0.0, 0.4) for _ in range(3)]
    for i, delay in enumerate(delays):
        path = tmp_path / f"atomic{i}" / "last.ckpt"
        path.parent.mkdir()
        _kill_writer("atomic", path, delay)
        assert _complete(path), f"atomic save torn by a kill after {delay:.3f} s"
        others = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
        assert all(n.startswith(".last.ckpt.") and n.endswith(".partial") for n in others), others  # never a *.ckpt
        remove_stale_temporaries(path.parent)
        assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    # the control: the same kills tear an in-place torch.save (so the check above can fail)
    for i, delay in enumerate(delays):
        path = tmp_path / f"plain{i}.ckpt"
        _kill_writer("plain", path, delay)
        if not _complete(path):
            break
    else:
        pytest.fail("no in-place save was torn: the kill moments do not test anything")


# ------------------------------------------------------------------ the train command, killed and resumed
TINY = tiny_overrides(
    "model.dropout=0.1",
    "data.eval_splits=[valid]",
    "trainer.max_time=null",
    "trainer.limit_val_batches=0",
    "trainer.limit_train_batches=7",  # epochs of 7 batches: kills land mid-epoch and at epoch ends
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.redraw.redraw_interval=5",
    "callbacks.throughput.window=1000",
    "module.warmup_steps=3",
    "~logger",
    "validate=false",
    "test=false",
    "num_threads=1",
    "seed=3",
    "+callbacks.losslog._target_=protein_performer.training.callbacks.LossLog",
)
STEPS = 30


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory, repo_root) -> Path:
    from protein_performer.data.ingest import ingest

    out = tmp_path_factory.mktemp("shards")
    ingest(input=str(repo_root / "data" / "uniprot_sample.fasta.gz"), output_dir=str(out), workers=1, progress=False)
    return out


def _cmd(shard_root: Path, run_dir: Path, losses: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "protein_performer.train",
        *TINY,
        f"data.root={shard_root}",
        f"hydra.run.dir={run_dir}",
        f"+callbacks.losslog.path={losses}",
        f"trainer.max_steps={STEPS}",
        *extra,
    ]


def _losses(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    return [(int(s), float(v)) for s, v in (line.split() for line in path.read_text().splitlines())]


def _check_every_checkpoint_loads(ckpt_dir: Path) -> int:
    """Every ``*.ckpt`` loads completely and holds the step its name says; returns last.ckpt's step."""
    steps = {}
    for p in sorted(ckpt_dir.glob("*.ckpt")):
        ckpt = torch.load(p, map_location="cpu", weights_only=False)  # a full read, not memory-mapped
        steps[p.name] = ckpt["global_step"]
        if p.name.startswith("step"):
            assert ckpt["global_step"] == int(p.stem.removeprefix("step")), p
    if "last.ckpt" not in steps:
        return 0
    newest = max((s for n, s in steps.items() if n != "last.ckpt"), default=0)
    # last.ckpt is written right after the step file: a kill in between leaves it one step behind
    assert newest - 1 <= steps["last.ckpt"] <= newest, steps
    return steps["last.ckpt"]


@pytest.fixture
def procs():
    """Subprocesses started by a test; any still running when it ends (a failure) are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_loss_curve(shard_root, tmp_path, procs):
    def start(run: str, losses: Path, *extra: str) -> subprocess.Popen:
        with open(tmp_path / f"{run}.stderr", "a") as err:
            procs.append(
                subprocess.Popen(
                    _cmd(shard_root, tmp_path / run, losses, *extra),
                    cwd=tmp_path,
                    env=ENV,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )
        return procs[-1]

    def stderr(run: str) -> str:
        return (tmp_path / f"{run}.stderr").read_text()[-3000:]

    ref_losses, losses = tmp_path / "ref_losses.txt", tmp_path / "losses.txt"
    ref = start("ref", ref_losses)  # the uninterrupted run, beside the killed ones (2 cores)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    rng = random.Random(2024)
    last_steps = []
    while len(last_steps) < 4:
        proc = start("run", losses, "ckpt_path=last")
        target = len(_losses(losses)) + rng.randint(1, 6)  # let it train a few steps, then a random moment
        deadline = time.monotonic() + 300
        while len(_losses(losses)) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:  # it finished before the kill
            assert proc.returncode == 0, stderr("run")
            break
        # after every kill: each checkpoint on disk loads completely (what a resume reads is whole)
        last_steps.append(_check_every_checkpoint_loads(ckpt_dir))
    assert len(last_steps) >= 3 and len(set(last_steps)) >= 2, f"kills landed after last.ckpt of steps {last_steps}"
    assert start("run", losses, "ckpt_path=last").wait(timeout=600) == 0, stderr("run")
    assert _check_every_checkpoint_loads(ckpt_dir) == STEPS
    assert not list(ckpt_dir.glob(".*.partial")), "temporary files of killed runs are removed"
    names = ["last.ckpt"] + [f"step{s:07d}.ckpt" for s in range(1, STEPS + 1)]
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == names  # no step...-v1.ckpt beside a rewritten step

    assert ref.wait(timeout=600) == 0, stderr("ref")
    reference = dict(_losses(ref_losses))
    assert sorted(reference) == list(range(STEPS)) and len(_losses(ref_losses)) == STEPS
    recorded = _losses(losses)
    assert {s for s, _ in recorded} == set(range(STEPS))  # steps after the last checkpoint appear twice
    # Exact equality, not a tolerance: the resumed process gets the same weights, optimizer state,
    # step, random features and data position bit for bit from the checkpoint, draws dropout from
    # per-step seeds, and runs the same single-threaded (OMP_NUM_THREADS=1, num_threads=1) CPU
    # kernels on the same batch shapes, so every floating-point operation repeats in the same order.
    # Any difference means some state was not restored.
    for step, loss in recorded:
        assert loss == reference[step], (step, loss, reference[step])
