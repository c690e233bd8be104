"""What a study reports: the machine it ran on, timings, JSON, markdown sections and figures.

Every file is written under a temporary name and renamed when complete
(:mod:`protein_performer.outputs`): a killed study leaves no half-written result; a
study's files are all written first and then put in place one after the other (:func:`publish_together`,
the JSON last), so a killed rerun leaves the previous results as they were.
Results go to the directory the caller names (a study's ``--out-dir``), by default
``./study_results`` under the current directory; never into the package.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from protein_performer import outputs

log = logging.getLogger(__name__)

OUT_DIRNAME = "study_results"  # the default output directory, under the current directory
MARKDOWN_NAME = "studies.md"  # the studies' markdown page, by default inside the output directory
MARKDOWN_TITLE = "# Studies: the paper's claims at workstation scale (issue 6)\n\n"
LOADED_FRACTION = 0.8  # a 1-minute load average above this fraction of the cores: "loaded"


def default_out_dir() -> Path:
    """``<current directory>/study_results``: where a study writes unless told otherwise."""
    return Path.cwd() / OUT_DIRNAME


def machine_info(device: str = "cpu") -> dict:
    """CPU model (``lscpu``), cores, torch threads, the 1-minute load average, date, GPU if any."""
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("lscpu failed: %s", e)
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    """``machine_info`` as one line of a report."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    loaded = "loaded by other agents" if info["load_average_1min"] > LOADED_FRACTION * (info["cores"] or 1) else "quiet"
    cores = f"{info['cores']} cores" + (
        f" of {info['machine_cores']}" if info.get("machine_cores", info["cores"]) != info["cores"] else ""
    )
    return (
        f"{info['cpu']}, {cores} ({info['torch_threads']} torch threads){gpu}; "
        f"{info['date_utc']}; 1-min load average {info['load_average_1min']:.1f} at the start ({loaded}); "
        f"torch {info['torch']}"
    )


def json_text(payload: dict) -> str:
    """A study's JSON as written to ``<name>.json``."""
    return json.dumps(payload, indent=2, default=float) + "\n"


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """``<out_dir>/<name>.json`` (default :func:`default_out_dir`), written atomically."""
    out_dir = default_out_dir() if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    outputs.write_text(path, json_text(payload))  # a killed run leaves no half file
    log.info("wrote %s", path)
    return path


def markdown_text(name: str, section: str, path: Path) -> str:
    """The markdown page ``path`` (its current text, or a new page) with the section between
    ``<!-- study:name -->`` markers replaced (or appended) by ``section``."""
    begin, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    block = f"{begin}\n{section.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else MARKDOWN_TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    return pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block


def staged_name(path: Path) -> Path:
    """Where a study writes ``path`` before it publishes it (:func:`publish_together`): hidden,
    beside it, marked with this process's id, with the same suffix (a plot's format)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.staged{path.suffix}")


def remove_stale(path: Path) -> None:
    """Remove the staged copies of ``path`` (and their own temporaries) that killed runs left."""
    stem, suffix = glob.escape(path.stem), glob.escape(path.suffix)
    for dots, pattern in ((1, f".{stem}.*.staged{suffix}"), (2, f"..{stem}.*.staged{suffix}.*.partial")):
        for staged in path.parent.glob(pattern):
            pid = staged.name[len(path.stem) + dots + 1 :].split(".")[0]
            if pid.isdigit() and not outputs.pid_alive(int(pid)):
                staged.unlink(missing_ok=True)


def publish_together(files: list[tuple[Path, Path]]) -> None:
    """Put each complete staged file in its target's place, in the order given (the last is the
    completeness mark). Every staged file is flushed to disk first; then an existing target is
    swapped with its staged file (``renameat2(RENAME_EXCHANGE)``, tens of microseconds, where a
    rename over it can wait milliseconds on the file system's journal) and a missing one renamed,
    one after the other with no other work between them; the old files (now under the staged
    names) are removed last. A run killed before the first swap leaves every target as it was; the
    swaps themselves take well under a millisecond."""
    for staged, _ in files:
        outputs.fsync_file(staged)
    old = []
    for staged, target in files:
        if target.exists() and outputs.exchange(staged, target):
            old.append(staged)
        else:
            os.replace(staged, target)
    for path in old:
        path.unlink(missing_ok=True)
    for folder in {target.parent for _, target in files}:
        outputs.sync_directory(folder)
    for _, target in files:
        log.info("wrote %s", target)


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 4 significant digits."""

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def best_time(fn: Callable[[], object], reps: int, device: str = "cpu") -> float:
    """The fastest of ``reps`` timed calls after one warm-up call: on a machine shared with other
    jobs the minimum is the least disturbed estimate of the work itself."""
    fn()
    return min(timer(fn, device) for _ in range(max(1, reps)))


def timer(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds for one call of ``fn`` (CUDA synchronized)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        outputs.save_figure(fig, path, dpi=dpi)
    finally:
        plt.close(fig)
