"""The frame of every study's command: common options, the start and the end of ``run``.

Every study is ``python -m protein_performer.experiments.<NAME>``: ``parse_args`` (``study_parser``,
``add_device_args``, ``add_output_args``, ``parse_study_args``), ``run(args)`` (``start_study`` ...
``write_study``), ``main`` (``study_args``). Results go to ``--out-dir`` (default
``./study_results``) and the markdown to ``--markdown`` (default ``<out-dir>/studies.md``);
``make studies`` passes ``benchmarks/results/studies`` and ``benchmarks/results/studies.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from protein_performer.experiments.reports import (
    MARKDOWN_NAME,
    default_out_dir,
    machine_info,
    update_markdown,
    write_json,
)

DEFAULT_THREADS = 2


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command as a user types it: ``python -m <module> <args>``."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *args])


def study_parser(doc: str) -> argparse.ArgumentParser:
    """A study's argument parser: the first paragraph of its module docstring ``doc`` as the
    description, defaults shown in ``--help``."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def add_device_args(p: argparse.ArgumentParser, threads_help: str | None = None) -> None:
    """``--device`` (default cpu) and ``--threads`` (torch CPU threads, default 2)."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=threads_help)


def add_output_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """``--out-dir`` (JSON + PNG), ``--markdown`` (the studies' markdown) and, unless ``progress``
    is False (a study that lists it later itself), ``--no-progress``."""
    p.add_argument("--out-dir", type=Path, default=default_out_dir(), help="directory for <study>.json and .png")
    p.add_argument(
        "--markdown",
        type=Path,
        default=argparse.SUPPRESS,  # parse_study_args fills it in
        help=f"markdown page the study updates its section of (default: <out-dir>/{MARKDOWN_NAME})",
    )
    if progress:
        p.add_argument("--no-progress", action="store_true")


def parse_study_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p.parse_args(argv)`` with ``--markdown`` defaulting to ``<out-dir>/studies.md``."""
    args = p.parse_args(argv)
    if hasattr(args, "out_dir") and getattr(args, "markdown", None) is None:
        args.markdown = args.out_dir / MARKDOWN_NAME
    return args


def study_args(
    name: str, parse_args: Callable[[list[str] | None], argparse.Namespace], argv: list[str] | None
) -> argparse.Namespace:
    """``main``'s start: the parsed ``argv``, with ``command`` (the command line, for the report);
    logging set up."""
    args = parse_args(argv)
    args.command = command_line(f"protein_performer.experiments.{name}", argv)
    setup_logging()
    return args


def start_study(args: argparse.Namespace) -> tuple[dict, float]:
    """``run``'s start: torch's CPU threads set to ``args.threads``; returns the machine
    (``machine_info``) and the start time (``time.perf_counter``)."""
    torch.set_num_threads(args.threads)
    return machine_info(args.device), time.perf_counter()


def study_record(name: str, args: argparse.Namespace, info: dict) -> dict:
    """The first keys of a study's JSON: its name, its arguments (paths as strings), the machine."""
    return {
        "study": name,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
    }


def study_command(name: str, args: argparse.Namespace) -> str:
    """The command that ran the study (``study_args`` sets it; else the module's bare command)."""
    return getattr(args, "command", f"python -m protein_performer.experiments.{name}")


def write_study(
    name: str, result: dict, args: argparse.Namespace, plot: Callable[[Path], None], markdown: Callable[[dict], str]
) -> None:
    """``run``'s end: ``plot(path)`` writes ``<out_dir>/<name>.png``, then ``<name>.json``, then the
    markdown section ``markdown(result)`` in ``args.markdown`` (default ``<out_dir>/studies.md``).
    Each file is written under a temporary name and renamed when complete, and the JSON comes
    after the plot: a killed study leaves no partial file, and a ``<name>.json`` means the plot of
    the same run is there too."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(args.out_dir / f"{name}.png")
    write_json(name, result, args.out_dir)
    markdown_path = args.markdown if getattr(args, "markdown", None) is not None else args.out_dir / MARKDOWN_NAME
    update_markdown(name, markdown(result), markdown_path)
