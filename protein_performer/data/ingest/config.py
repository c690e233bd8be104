"""The ingest configuration: defaults from conf/ingest.yaml, overrides, validation, and the work units.

:func:`resolve_config` builds an :class:`IngestConfig` once (frozen; one field per key of
conf/ingest.yaml, paths made absolute, plus ``units``); the stages read it by attribute.
``ingest_config.json`` (the fingerprint) and the manifest record some of its fields as JSON.

Work units cut the input for stage 1: whole files, or byte ranges ``[start, end)`` of one
uncompressed file (``workers=N`` or ``part=i num_parts=n``): :class:`WorkUnit`, recorded in
``ingest_config.json`` as ``{"file", "start", "end"}``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from protein_performer.data.fasta import is_gzip
from protein_performer.data.shards import GZIP_STRATEGIES

from .common import HASH_SPLITS, IngestError

log = logging.getLogger(__name__)

PAPER_OOD_FAMILIES = [
    "PF18369", "PF04680", "PF17988", "PF12325", "PF03272", "PF03938", "PF17724", "PF10696",
    "PF11968", "PF04153", "PF06173", "PF12378", "PF04420", "PF10841", "PF06917", "PF03492",
    "PF06905", "PF15340", "PF17055", "PF05318",
]  # fmt: skip

# Keys of the config that change the output; an output dir written with other values is refused.
FINGERPRINT_KEYS = (
    "input", "annotations", "ood_families", "seed", "fractions", "min_length", "max_length",
    "shard_size", "compression", "compression_level", "gzip_strategy", "chunk_size", "strict", "units",
)  # fmt: skip

_NOT_OPTIONS = ("hydra", "defaults")  # nodes of conf/ingest.yaml that are not ingest options


@dataclass(frozen=True)
class WorkUnit:
    """What one stage-1 job reads: input file ``file`` (an index into ``input``), bytes ``[start, end)``
    (``end`` None: to the end of the file)."""

    file: int
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class IngestConfig:
    """The options of an ingest (the keys of conf/ingest.yaml, documented there), resolved and checked
    by :func:`resolve_config`; ``units``: the work units of stage 1 (:func:`plan_units`).

    In merge mode (``merge=true``) only ``output_dir``, ``workers`` and ``progress`` are read: the
    rest comes from the output folder's ``ingest_config.json``.
    """

    input: list[str] | None
    output_dir: str
    fractions: dict[str, float]
    seed: int
    ood_families: list[str]
    annotations: list[str] | None
    min_length: int | None
    max_length: int | None
    strict: bool
    shard_size: int
    compression: str | None
    compression_level: int | None
    gzip_strategy: str
    chunk_size: int
    workers: int
    part: int | None
    num_parts: int | None
    merge: bool
    resume: bool
    overwrite: bool
    progress: bool
    block_size: int
    merge_memory_mb: float | None
    fail_after_records: int | None  # test hooks: raise after this many records (stage 1) / shards (stage 3)
    fail_after_shards: int | None
    units: list[WorkUnit] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the units of an ingest_config.json (merge) come as its JSON objects
        object.__setattr__(self, "units", [u if isinstance(u, WorkUnit) else WorkUnit(**u) for u in self.units])


def default_config() -> dict:
    """The defaults of conf/ingest.yaml (without the ``hydra`` node), as a plain dict.

    Read with PyYAML's C loader (OmegaConf's pure-Python loader took ~10 ms, a serial cost of
    every ingest). The file's values are plain YAML; its only interpolations are in the ``hydra``
    node, which is dropped.
    """
    path = Path(__file__).resolve().parents[2] / "conf" / "ingest.yaml"
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for name in _NOT_OPTIONS:
        cfg.pop(name, None)
    return cfg


def resolve_config(cfg: Any = None, **overrides) -> IngestConfig:
    """Defaults < ``cfg`` (dict or DictConfig) < ``overrides``; paths made absolute; checked."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out = default_config()
    for source in (cfg or {}, overrides):
        for key, value in dict(source).items():
            if key in _NOT_OPTIONS:
                continue
            if key not in out:
                raise IngestError(f"unknown ingest option {key!r}; known options: {', '.join(sorted(out))}")
            out[key] = value
    if not out.get("output_dir"):
        raise IngestError("output_dir is required: python -m protein_performer.ingest input=... output_dir=...")
    out["output_dir"] = str(Path(out["output_dir"]).expanduser().absolute())
    if out["merge"]:
        return IngestConfig(**out)
    out["input"] = _input_files(out["input"])
    out["annotations"] = _annotation_files(out["annotations"])
    out["ood_families"] = [_norm_family(f) for f in (out["ood_families"] or [])]
    out["fractions"] = _fractions(out["fractions"])
    _check_output_options(out)
    out["units"] = plan_units(out["input"], int(out["workers"]), out["num_parts"])
    return IngestConfig(**out)


def _input_files(inputs: Any) -> list[str]:
    if inputs in (None, "", "???"):
        raise IngestError("input is required: a FASTA(.gz) path or a list of paths (input='[a.fa,b.fa]')")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [str(Path(p).expanduser().absolute()) for p in inputs]
    for path in paths:
        if Path(path).is_dir():
            raise IngestError(
                f"input {path} is a directory; give a FASTA file, or a list of files: input='[a.fasta.gz,b.fasta.gz]'"
            )
        if not Path(path).is_file():
            raise IngestError(f"input file not found: {path}")
    return paths


def _annotation_files(annotations: Any) -> list[str]:
    if not annotations:
        return []
    if isinstance(annotations, (str, os.PathLike)):
        annotations = [annotations]
    paths = [str(Path(p).expanduser().absolute()) for p in annotations]
    for path in paths:
        if not Path(path).is_file():
            raise IngestError(f"annotation file not found (or a directory): {path}")
    return paths


def _fractions(fractions: Any) -> dict[str, float]:
    values = {k: float(fractions[k]) for k in HASH_SPLITS}
    if set(fractions) != set(HASH_SPLITS) or min(values.values()) < 0 or abs(sum(values.values()) - 1) > 1e-9:
        raise IngestError(f"fractions must give train, valid, test >= 0 summing to 1, got {dict(fractions)}")
    return values


def _check_output_options(cfg: dict) -> None:
    if cfg["gzip_strategy"] not in GZIP_STRATEGIES:
        raise IngestError(f"gzip_strategy must be one of {', '.join(GZIP_STRATEGIES)}, got {cfg['gzip_strategy']!r}")
    if int(cfg["shard_size"]) < 1:
        raise IngestError(f"shard_size must be >= 1 sequences, got {cfg['shard_size']}")
    min_length, max_length = cfg["min_length"], cfg["max_length"]
    if min_length is not None and max_length is not None and min_length > max_length:
        raise IngestError(f"min_length {min_length} > max_length {max_length}")


def _norm_family(family: Any) -> str:
    """A Pfam accession without its version (``PF00013.2`` -> ``PF00013``); a name as it is."""
    family = str(family).strip()
    return family.split(".")[0] if re.fullmatch(r"PF\d{5}(\.\d+)?", family) else family


def plan_units(inputs: list[str], workers: int, num_parts: int | None) -> list[WorkUnit]:
    """Cut the input into work units: whole files, or byte ranges of one uncompressed file."""
    whole = [WorkUnit(i) for i in range(len(inputs))]
    if num_parts is not None:
        num_parts = int(num_parts)
        if num_parts < 1:
            raise IngestError(f"num_parts must be >= 1, got {num_parts}")
        if len(inputs) == num_parts:
            return whole
        if len(inputs) == 1:
            return _byte_ranges(inputs[0], num_parts)
        raise IngestError(
            f"num_parts={num_parts} with {len(inputs)} input files: give one input file per part "
            f"({num_parts} files), or a single uncompressed FASTA file to cut into byte ranges"
        )
    if workers > 1 and len(inputs) == 1:
        if is_gzip(inputs[0]):
            log.warning(
                "%s is gzip-compressed: it cannot be cut into byte ranges, so it is read by one worker. "
                "For parallel ingestion decompress it, or give several input files (one per worker).",
                inputs[0],
            )
            return whole
        return _byte_ranges(inputs[0], workers)
    return whole


def _byte_ranges(path: str, n: int) -> list[WorkUnit]:
    if is_gzip(path):
        raise IngestError(
            f"{path} is gzip-compressed: byte ranges (part/num_parts, workers) need an uncompressed "
            "file (gzip streams cannot be entered in the middle). Decompress it (`gunzip -k`), or "
            "split the input into several files and pass them as a list, one per part: "
            "input='[part0.fasta.gz,part1.fasta.gz,...]' num_parts=<number of files>."
        )
    size = os.path.getsize(path)
    return [WorkUnit(0, size * i // n, size * (i + 1) // n) for i in range(n)]


def fingerprint(cfg: IngestConfig) -> dict:
    """The options that change the output (``ingest_config.json``: plain JSON values)."""
    out = {k: getattr(cfg, k) for k in FINGERPRINT_KEYS}
    out["units"] = [asdict(u) for u in cfg.units]
    return out
