"""What a study reports: the machine it ran on, timings, JSON, markdown sections and figures.

Every file is written under a temporary name and renamed when complete
(:mod:`protein_performer.analysis.atomic`): a killed study leaves no half-written result.
Results go to the directory the caller names (a study's ``--out-dir``), by default
``./study_results`` under the current directory; never into the package.
"""

from __future__ import annotations

import datetime as dt
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

from protein_performer.analysis import atomic

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


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """``<out_dir>/<name>.json`` (default :func:`default_out_dir`), written atomically."""
    out_dir = default_out_dir() if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    atomic.write_text(path, json.dumps(payload, indent=2, default=float) + "\n")  # a killed run leaves no half file
    log.info("wrote %s", path)
    return path


def update_markdown(name: str, section: str, path: Path | None = None) -> Path:
    """Replace (or append) the section between ``<!-- study:name -->`` markers in ``path``
    (default ``<default_out_dir>/studies.md``)."""
    path = default_out_dir() / MARKDOWN_NAME if path is None else Path(path)
    begin, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    block = f"{begin}\n{section.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else MARKDOWN_TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)
    log.info("updated section %r of %s", name, path)
    return path


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
        atomic.save_figure(fig, path, dpi=dpi)
    finally:
        plt.close(fig)
