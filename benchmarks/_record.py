"""The one record format of benchmarks/results/*.json, and the helpers that render records.

A record is a JSON object that every benchmark writes through :func:`write`:

    {"benchmark": "<name>",   # the benchmark whose section() renders it (the script's stem)
     "command": "python benchmarks/<name>.py ...",
     "machine": "Intel(R) Xeon(R) Processor, 2 cores, torch 2.13.0+cpu, Python 3.11.7",
     "date": "2026-12-07T04:55:07+00:00",   # ISO 8601 in UTC (a day alone when only the day is known)
     ...}                     # the benchmark's own fields

:func:`machine` and :func:`now` give the machine and date fields, :func:`when` reads the date back.
The rest (``Floor``, :func:`table`, :func:`fmt`, :func:`source`) is shared by the benchmarks'
``section()`` and ``floors()`` functions that benchmarks/report.py collects into RESULTS.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def machine(device: str = "cpu") -> str:
    """The machine in one line: the GPU (``device="cuda"``), the CPU model and the cores this process may
    run on, torch and Python versions."""
    import torch

    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f"{torch.cuda.get_device_name(0)}, " if device == "cuda" else ""
    return f"{gpu}{cpu}, {cores} cores, torch {torch.__version__}, Python {platform.python_version()}"


def now() -> str:
    """The date field: the current time in UTC, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def when(date: str) -> dt.datetime:
    """A date field as an aware datetime (a day alone is its midnight UTC)."""
    stamp = dt.datetime.fromisoformat(date)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)


def day(date: str) -> str:
    """A date field as the pages show it: '2026-12-07 04:55 UTC', or the day alone when that is all it has."""
    stamp = when(date).astimezone(dt.timezone.utc)
    return stamp.strftime("%Y-%m-%d") if len(date) == 10 else stamp.strftime("%Y-%m-%d %H:%M UTC")


def command() -> str:
    """This process's command line as a user types it from the repository root."""
    script = Path(sys.argv[0])
    if script.is_absolute() and REPO in script.parents:
        script = script.relative_to(REPO)
    return " ".join(["python", script.as_posix(), *sys.argv[1:]])


def record(benchmark: str, fields: dict, device: str = "cpu", cmd: str | None = None) -> dict:
    """A new record of ``benchmark``: its command (default: this process's), machine and date, then ``fields``."""
    return {"benchmark": benchmark, "command": cmd or command(), "machine": machine(device), "date": now(), **fields}


def write(path: Path, rec: dict) -> Path:
    """Write a record (checked for the common fields) as indented JSON."""
    from protein_performer.outputs import write_text

    missing = [k for k in ("benchmark", "command", "machine", "date") if not isinstance(rec.get(k), str)]
    if missing:
        raise ValueError(f"record for {path} lacks {missing}")
    when(rec["date"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(rec, indent=2, default=str) + "\n")


def load(path: Path, root: Path = RESULTS) -> dict:
    """A record with ``_path``, its path under ``root`` (what the pages link to)."""
    rec = json.loads(Path(path).read_text())
    rec["_path"] = Path(path).relative_to(root).as_posix()
    return rec


def latest(records: Iterable[dict], key: Callable[[dict], object]) -> list[dict]:
    """The newest record of each configuration ``key(record)``, in the order the configurations first appear."""
    best: dict[object, dict] = {}
    for rec in records:
        k = key(rec)
        if k not in best or when(rec["date"]) > when(best[k]["date"]):
            best[k] = rec
    return list(best.values())


def newest(records: Iterable[dict]) -> dict | None:
    """The record with the latest date, None when there is none."""
    return max(records, key=lambda rec: when(rec["date"]), default=None)


# ------------------------------------------------------------------------------------------- rendering
def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, '-' for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def source(rec: dict) -> str:
    """The link to a record's JSON from RESULTS.md."""
    return f"[`{rec['_path']}`](results/{rec['_path']})"


@dataclass
class Floor:
    """One number an issue asks for: ``value`` must be <= (or >=) ``limit``; None means not measured."""

    issue: str
    what: str
    limit: float
    at_most: bool
    value: float | None
    run: dict | None
    command: str = ""  # the command that would measure it, named while there is no run

    @property
    def verdict(self) -> str:
        """PASS, FAIL or NOT MEASURED."""
        if self.value is None:
            return "NOT MEASURED"
        return "PASS" if (self.value <= self.limit if self.at_most else self.value >= self.limit) else "FAIL"

    def row(self) -> list[str]:
        """The floor's row of the floors table."""
        if self.run is None:
            where = f"none yet: `{self.command}`"
        elif self.value is None:
            where = f"not in {source(self.run)} ({day(self.run['date'])})"
        else:
            where = f"{source(self.run)}, {day(self.run['date'])}"
        bound = ("<= " if self.at_most else ">= ") + f"{self.limit:g}"
        return [self.issue, self.what, bound, fmt(self.value), f"**{self.verdict}**", where]
