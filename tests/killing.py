"""What the rerun-safety and crash tests share: a command run as a user runs it (a subprocess with
a fixed environment), killed with a real SIGKILL at a chosen moment, and a byte snapshot of an
output folder to compare before and after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command_env(**extra: str) -> dict:
    """The environment every command subprocess of the tests runs with: the checkout importable,
    one thread (the same for a reference run and the run it is compared with), no tracebacks."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PROTEIN_PERFORMER_TRACEBACK="0", **extra)


def module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"protein_performer.{module}", *map(str, args)]


def run_cmd(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=timeout)


def kill_after(cmd: list[str], cwd: Path, delay: float, started: Path | Callable[[int], bool] | None = None) -> bool:
    """Start ``cmd``; SIGKILL it ``delay`` s after ``started`` appears (a path, or a test of the
    process id that turns true, polled every 2 ms; after the start if None). Returns True if it
    was killed, False if it had finished first."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = (lambda pid: started.exists()) if isinstance(started, Path) else started
    t_end = time.monotonic() + 300
    while ready is not None and not ready(proc.pid) and proc.poll() is None and time.monotonic() < t_end:
        time.sleep(0.002)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def timed_run(cmd: list[str], cwd: Path) -> float:
    """Run ``cmd`` to the end (it must succeed); its wall time in seconds."""
    t0 = time.monotonic()
    res = run_cmd(cmd, cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    return time.monotonic() - t0


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (hidden ones too) but Hydra's job logs (``<command>.log``, which
    every run appends to): relative path -> (bytes, mtime_ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


def contents(snap: dict[str, tuple[bytes, int]]) -> dict[str, bytes]:
    return {k: v[0] for k, v in snap.items()}


def staging(folder: Path) -> Callable[[int], bool]:
    """True once a run has started writing the new output of ``folder`` (its staging folder is there)."""
    return lambda pid: any(folder.parent.glob(f".{folder.name}.staging-*"))


def leftovers(folder: Path) -> list[str]:
    """Hidden staging / replaced folders beside ``folder`` (a killed rerun's; the next run removes them)."""
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.*"))
