"""The frame of every study's command: common options, the start and the end of ``run``.

Every study is ``python -m protein_performer.studies.<NAME>``: ``parse_args`` (``study_parser``,
``add_device_args``, ``add_output_args``, ``parse_study_args``), ``run(args)`` (``start_study`` ...
``write_study``), ``main`` (``study_args``). Results go to ``--out-dir`` (default
``./study_results``) and the markdown to ``--markdown`` (default ``<out-dir>/studies.md``);
``make studies`` passes ``benchmarks/results/studies`` and ``benchmarks/results/studies.md``.

A rerun is safe: the study's files (``<study>.png``, its markdown section, ``<study>.json``) are
written under hidden names and put in the old ones' places only at the end, in one burst of
atomic swaps (well under a millisecond), the JSON last, so a rerun killed at any other moment
leaves the previous results byte-identical. ``--resume``: when
``<out-dir>/<study>.json`` holds a finished run with the same settings, say so and exit 0 without
work (other settings: an error; rerun without ``--resume`` to replace it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from protein_performer.studies.reports import (
    MARKDOWN_NAME,
    default_out_dir,
    json_text,
    machine_info,
    markdown_text,
    publish_together,
    remove_stale,
    staged_name,
)

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2
# arguments that are no setting of the result: where it goes, how it is shown, --resume itself
NOT_SETTINGS = frozenset({"command", "resume", "no_progress", "out_dir", "markdown", "cache_dir"})


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
    """``--out-dir`` (JSON + PNG), ``--markdown`` (the studies' markdown), ``--resume`` and, unless
    ``progress`` is False (a study that lists it later itself), ``--no-progress``."""
    p.add_argument("--out-dir", type=Path, default=default_out_dir(), help="directory for <study>.json and .png")
    p.add_argument(
        "--markdown",
        type=Path,
        default=argparse.SUPPRESS,  # parse_study_args fills it in
        help=f"markdown page the study updates its section of (default: <out-dir>/{MARKDOWN_NAME})",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="if <out-dir>/<study>.json holds a finished run with the same settings, say so and exit 0 without work",
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
    logging set up. With ``--resume`` and a finished run of the same settings: ``SystemExit(0)``."""
    args = parse_args(argv)
    args.command = command_line(f"protein_performer.studies.{name}", argv)
    setup_logging()
    if getattr(args, "resume", False) and finished(name, args):
        raise SystemExit(0)
    return args


def output_name(name: str, args: argparse.Namespace) -> str:
    """The stem of a study's files: its name, plus ``--tag`` for the studies that have one."""
    return name + getattr(args, "tag", "")


def study_settings(args: argparse.Namespace) -> dict:
    """The arguments that make the result (:data:`NOT_SETTINGS` left out), as its JSON holds them."""
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    return json.loads(json.dumps(record, default=str))


def finished(name: str, args: argparse.Namespace) -> bool:
    """``--resume``: True (logged) when ``<out_dir>/<study>.json`` holds a finished run with the same
    settings; False when there is none (the study runs); exits with an error when the settings differ."""
    path = args.out_dir / f"{output_name(name, args)}.json"
    if not path.is_file():
        log.info("--resume: no finished run at %s; running the study", path)
        return False
    try:
        stored = json.loads(path.read_text()).get("args", {})
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"error: {path}: not a study's JSON ({e}); rerun without --resume to replace it") from e
    stored = {k: v for k, v in stored.items() if k not in NOT_SETTINGS}
    current = study_settings(args)
    if stored != current:
        diff = ", ".join(
            f"{k}: {stored.get(k, '(none)')!r} -> {current.get(k, '(none)')!r}"
            for k in sorted(set(stored) | set(current))
            if stored.get(k) != current.get(k)
        )
        raise SystemExit(
            f"error: {path} holds a run with other settings ({diff}); rerun without --resume to replace it"
        )
    log.info("%s is complete (a finished run with the same settings): nothing to do", path)
    return True


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
    return getattr(args, "command", f"python -m protein_performer.studies.{name}")


def write_study(
    name: str, result: dict, args: argparse.Namespace, plot: Callable[[Path], None], markdown: Callable[[dict], str]
) -> None:
    """``run``'s end: ``<out_dir>/<name>.png`` (``plot(path)``), the markdown section
    ``markdown(result)`` in ``args.markdown`` (default ``<out_dir>/studies.md``) and
    ``<name>.json``. All three are first written in full under hidden names beside their targets
    (:func:`~protein_performer.studies.reports.staged_name`), then swapped into place one after
    the other (:func:`~protein_performer.studies.reports.publish_together`), the JSON last: a
    study killed at any moment before leaves the previous files byte-identical (and no partial
    file), and a ``<name>.json`` means the plot and the section of the same run are there too.
    Staged files of killed runs are removed here."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path = Path(args.markdown if getattr(args, "markdown", None) is not None else args.out_dir / MARKDOWN_NAME)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    targets = [args.out_dir / f"{name}.png", markdown_path, args.out_dir / f"{name}.json"]
    staged = [staged_name(t) for t in targets]
    for target in targets:
        remove_stale(target)
    try:
        plot(staged[0])
        staged[1].write_text(markdown_text(name, markdown(result), targets[1]))
        staged[2].write_text(json_text(result))
        publish_together(list(zip(staged, targets)))
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
