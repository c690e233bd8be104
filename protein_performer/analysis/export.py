"""Attention maps (and embeddings) out of a trained model: checkpoint -> maps.h5.

The maps are the model's own ``attention_matrix`` on the queries and keys of every layer, with the
features the checkpoint holds (``model.eval()``, no redraw): for FAVOR+ that is the paper's
``V = I`` construction, ``D^-1 Q' (K')^T``, causally masked for a UNI model; for the exact
baseline ``softmax(Q K^T / sqrt(d))``.

Model input per sequence of L residues ``s`` (as in training, ``data/collate.py``):
BID ``[bos, s, eos]``, UNI ``[bos, s]`` (a UNI model never sees eos as input). Rows and columns
of the special tokens are dropped, so every map is L x L and row i is the attention of residue i
over the residues (rows need not sum to 1: the mass on bos / eos is left out, as in ESM).

Memory is bounded per sequence: sequences go through the model one at a time (no padding), and a
forward pre-hook on each layer's attention computes that layer's maps from the hidden states
entering it, writes them (float16, plus ``apc(symmetrize(.))``) to the HDF5 file and drops them
before the next layer runs. So at most one layer's (heads, L, L) maps are in memory; FAVOR+'s
``attention_matrix`` itself works in blocks of query rows.

Embeddings (``include`` ``mean`` / ``per_token``): the final layer's representation after the
final LayerNorm, per residue and mean-pooled over the residues (ESM's ``extract.py``).

Sequences longer than the model's ``max_len`` (special tokens included): ``crop="error"`` (a clear
error naming the record), ``"skip"`` (counted and reported), ``"start"`` or ``"center"`` (a window
of ``max_len`` tokens; the group gets ``crop_start`` and ``full_length`` attributes).

The file layout is :mod:`protein_performer.analysis.maps_io`'s; this module adds the root
attribute ``export`` (JSON: checkpoint, seed, input, include, crop, counts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np
import torch

from protein_performer.analysis.atomic import publish
from protein_performer.analysis.maps_io import (
    PARTIAL_SUFFIX, LayerRecord, MapsWriter, MissingFileError, record_checksum,
)
from protein_performer.data.tokenizer import Tokenizer, UnknownResidueError
from protein_performer.errors import UserError
from protein_performer.model.performer import PerformerConfig, PerformerLM

log = logging.getLogger(__name__)


class ExportError(UserError, ValueError):
    """A bad checkpoint, input, output path or setting of the export (one line: file, what to do)."""

INCLUDE = ("attentions", "apc", "mean", "per_token")
CROPS = ("error", "skip", "start", "center")
RANDOM = "random"


# ------------------------------------------------------------------------------ the model
@dataclass
class LoadedModel:
    """A model ready for export and where it came from."""

    model: PerformerLM
    checkpoint: str                 # the .ckpt path, or "random"
    sha256: str = ""                # of the checkpoint file ("" for random init)
    seed: int | None = None         # random init: the seed of the weights
    info: dict[str, Any] = field(default_factory=dict)  # objective, global_step, ... from the checkpoint

    @property
    def config(self) -> dict[str, Any]:
        return asdict(self.model.config)


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint with objects beyond tensors and plain containers
        log.debug("%s: weights_only load failed (%s); loading it in full (trusted file)", path, e)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ExportError(f"{path}: not a readable PyTorch / Lightning checkpoint, or a truncated / corrupted one "
                              f"({_first_line(e2)}); give the .ckpt that training wrote") from e2


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _first_problem(e: BaseException) -> str:
    """The first specific line of a load_state_dict error (a size mismatch or a missing key)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


def _plain(x: Any) -> Any:
    """OmegaConf containers and tuples -> plain dicts / lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _check_config(cfg: dict, where: str) -> dict:
    cfg = {k: v for k, v in _plain(cfg).items() if k != "_target_"}
    known = {f.name for f in fields(PerformerConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ExportError(f"{where}: model config keys {unknown} are not PerformerLM arguments ({sorted(known)})")
    return cfg


def model_config_from(source: dict | str | Path) -> dict:
    """PerformerLM kwargs from a dict, a Lightning checkpoint (``hyper_parameters["model"]``) or a
    YAML / JSON file holding them (a ``_target_`` key is ignored)."""
    if isinstance(source, dict) or not isinstance(source, (str, Path)):
        return _check_config(dict(_plain(source)), "model_config")
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"model_config: no such file {path}")
    if path.suffix in (".yaml", ".yml", ".json"):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            cfg = cfg["model"]
        if not isinstance(cfg, dict):
            raise ExportError(f"{path}: expected a mapping of PerformerLM arguments")
        return _check_config(cfg, str(path))
    return _config_from_checkpoint(_torch_load(path), path)


def _config_from_checkpoint(ckpt: dict, path: Path) -> dict:
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    cfg = hp.get("model") if isinstance(hp, dict) else None
    if not isinstance(cfg, dict) and cfg is not None:
        cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise ExportError(f"{path}: the checkpoint stores no model config in hyper_parameters['model'] "
                         "(train with protein_performer.training.ProteinLM, or pass model_config=)")
    return _check_config(cfg, str(path))


def _build(cfg: dict, source: Any) -> PerformerLM:
    try:
        return PerformerLM(**cfg)
    except (ValueError, TypeError) as e:
        where = "model_config (dict)" if isinstance(source, dict) else str(source)
        raise ExportError(f"{where}: not a valid PerformerLM config ({_first_line(e)})") from e


def load_model(checkpoint: str | Path, model_config: dict | str | Path | None = None, seed: int = 0,
               device: str | torch.device = "cpu") -> LoadedModel:
    """A :class:`PerformerLM` in eval mode, from a Lightning checkpoint of ``ProteinLM`` or random.

    ``checkpoint``: a ``.ckpt`` path; the architecture comes from ``hyper_parameters["model"]``
    (``model_config`` overrides it when given) and the weights and FAVOR+ features from
    ``state_dict`` (the ``model.`` prefix stripped; every key must fit). ``checkpoint="random"``:
    a random-init model of the architecture ``model_config`` (a dict, a checkpoint or a YAML
    file), weights drawn from ``seed`` without touching the global RNG: the contact baseline.
    """
    if str(checkpoint) == RANDOM:
        if model_config is None:
            raise ExportError("checkpoint=random needs model_config= (a trained checkpoint, a YAML file or a dict) "
                             "for the architecture")
        cfg = model_config_from(model_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _build(cfg, model_config)
        log.info("random-init model (seed %d): %s", seed, {k: cfg.get(k) for k in ("attention", "depth", "heads", "dim")})
        return LoadedModel(model.to(device).eval().requires_grad_(False), RANDOM, "", int(seed),
                           {"source": str(model_config) if not isinstance(model_config, dict) else "dict"})
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ExportError(f"{path}: not a Lightning checkpoint (no 'state_dict'); give the .ckpt that training wrote")
    cfg = _config_from_checkpoint(ckpt, path) if model_config is None else model_config_from(model_config)
    model = _build(cfg, model_config if model_config is not None else path)
    state = ckpt["state_dict"]
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: weights do not fit the model config {cfg} ({_first_problem(e)}); give "
                          "the model_config the checkpoint was trained with, or none (it is read from the "
                          "checkpoint)") from e
    hp = ckpt.get("hyper_parameters") or {}
    info = {"objective": hp.get("objective"), "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}
    log.info("loaded %s (step %s): %s", path, info["global_step"],
             {k: cfg.get(k) for k in ("attention", "causal", "depth", "heads", "dim")})
    return LoadedModel(model.to(device).eval().requires_grad_(False), str(path), file_sha256(path), None, info)


# ------------------------------------------------------------------------------ sequences
@dataclass(frozen=True)
class SequenceRecord:
    """One sequence to export; ``source`` is ``<structure file>:<chain>`` or the FASTA file name."""

    id: str
    sequence: str
    source: str = ""


@dataclass
class InputReport:
    """What reading the input left out (counted, with reasons)."""

    failures: list[dict] = field(default_factory=list)

    def add(self, source: str, reason: str) -> None:
        log.warning("%s", reason)
        self.failures.append({"source": source, "reason": reason})


def is_structure_input(path: str | Path) -> bool:
    from protein_performer.analysis.structures import STRUCTURE_SUFFIXES

    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(STRUCTURE_SUFFIXES)


def read_sequences(input: str | Path, min_residues: int = 30, invalid: str = "error",
                   report: InputReport | None = None) -> Iterator[SequenceRecord]:
    """The sequences of a FASTA file (plain or gzip) or of the protein chains of a structure folder
    (or one PDB / mmCIF file; chains as :func:`analysis.structures.load_structures` chooses them:
    every protein chain of at least ``min_residues`` residues, ``id`` = ``<stem>_<chain>``,
    ``source`` = ``<file name>:<chain>``, the keys the contacts step matches on).

    FASTA records: ``id`` = the header's first word. An empty record or one with a character
    outside the alphabet raises ``ValueError`` naming the file, line and id
    (``invalid="error"``), or is counted in ``report`` and skipped (``invalid="skip"``).
    """
    if invalid not in ("error", "skip"):
        raise ExportError(f"invalid must be 'error' or 'skip', got {invalid!r}")
    report = report if report is not None else InputReport()
    path = Path(input)
    if not path.exists():
        raise MissingFileError(f"input not found: {path}")
    if is_structure_input(path):
        from protein_performer.analysis.structures import load_structures

        from protein_performer.analysis.structures import structure_files

        if path.is_dir() and not structure_files(path):
            raise ExportError(f"{path}: no structure files (.pdb, .cif, .ent, .gz) in this folder; give a folder of "
                              "PDB / mmCIF files or a FASTA file")
        chains, failures = load_structures(path, min_residues=min_residues)
        for f in failures:
            report.failures.append({"source": f"{f.source}:{f.chain}" if f.chain else f.source, "reason": f.reason})
        if not chains:
            why = f" ({failures[0].reason}{f'; {len(failures) - 1} more failures' if len(failures) > 1 else ''})" \
                if failures else ""
            raise ExportError(f"{path}: no protein chain with >= {min_residues} standard residues found{why}")
        for c in chains:
            yield SequenceRecord(c.name, c.sequence, c.key)
        return
    from protein_performer.data.fasta import read_fasta

    tok = Tokenizer()
    for rec in read_fasta(path):
        header = rec.header_text.strip()
        rid = header.split()[0] if header else f"line{rec.line}"
        problem = None
        if not rec.sequence.rstrip(b"*"):
            problem = "empty sequence"
        else:
            try:
                seq = tok.decode(tok.encode_bytes(rec.sequence))
            except UnknownResidueError as e:
                problem = str(e)
        if problem is not None:
            msg = f"{path}:{rec.line} record {rid}: {problem}"
            if invalid == "error":
                raise ExportError(msg + " (set invalid=skip to leave such records out)")
            report.add(f"{path.name}:{rec.line}", msg)
            continue
        yield SequenceRecord(rid, seq, path.name)


# ------------------------------------------------------------------------------ export
def model_input(residues: np.ndarray, causal: bool, tok: Tokenizer | None = None) -> np.ndarray:
    """Token ids the model reads for residue ids ``residues``: BID ``[bos, s, eos]``, UNI
    ``[bos, s]`` (the residues sit at positions 1..L in both)."""
    tok = tok or Tokenizer()
    parts = [[tok.bos_id], residues] + ([] if causal else [[tok.eos_id]])
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def crop_window(length: int, max_residues: int, crop: str, record: str) -> tuple[int, int] | None:
    """``(start, stop)`` of the residues to keep, or None to skip the record (``crop="skip"``)."""
    if crop not in CROPS:
        raise ExportError(f"crop must be one of {CROPS}, got {crop!r}")
    if length <= max_residues:
        return 0, length
    if crop == "error":
        raise ExportError(f"{record}: {length} residues do not fit the model's max_len ({max_residues} residues "
                         "besides the special tokens); set crop=start|center|skip")
    if crop == "skip":
        return None
    start = 0 if crop == "start" else (length - max_residues) // 2
    return start, start + max_residues


@torch.no_grad()
def run_sequence(model: PerformerLM, residues: np.ndarray, on_layer=None, want_repr: bool = False,
                 device: str | torch.device | None = None) -> torch.Tensor | None:
    """Run one sequence (residue ids, no special tokens) through ``model``.

    ``on_layer(layer, maps)`` is called once per layer, in order, with that layer's maps
    ``(heads, L, L)`` float32 (special tokens dropped), computed by the layer's
    ``attention_matrix`` from the hidden states entering it, before the next layer runs.
    Returns the final representation ``(L, dim)`` (after the final LayerNorm) when ``want_repr``.
    """
    if model.training:
        raise RuntimeError("export needs model.eval(): maps come from the model's fixed features")
    device = device if device is not None else next(model.parameters()).device
    causal = bool(model.config.causal)
    L = int(len(residues))
    tokens = torch.as_tensor(model_input(residues, causal), device=device)[None]  # (1, T)
    keep = slice(1, L + 1)
    fired: list[int] = []
    final: list[torch.Tensor] = []
    handles = []

    def attention_hook(layer: int):
        def hook(module, args, kwargs):
            x = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("key_padding_mask")
            maps = module.attention_matrix(x, mask)  # (1, h, T, T) float32
            fired.append(layer)
            if on_layer is not None:
                on_layer(layer, maps[0, :, keep, keep])
            del maps
        return hook

    try:
        if on_layer is not None:
            for i, block in enumerate(model.blocks):
                handles.append(block.attn.register_forward_pre_hook(attention_hook(i), with_kwargs=True))
        if want_repr:
            handles.append(model.norm.register_forward_hook(lambda m, a, out: final.append(out[0, keep])))
        model(tokens)
    finally:
        for h in handles:
            h.remove()
    if on_layer is not None and fired != list(range(len(model.blocks))):
        raise RuntimeError(f"attention hooks fired for layers {fired}, expected 0..{len(model.blocks) - 1}: "
                           "PerformerLM's forward no longer calls block.attn; update export.run_sequence")
    return final[0] if want_repr else None


def _parse_include(include: Iterable[str]) -> tuple[str, ...]:
    inc = tuple(str(x) for x in include)
    bad = [x for x in inc if x not in INCLUDE]
    if bad or not inc:
        raise ExportError(f"include must be a non-empty subset of {INCLUDE}, got {list(inc)}")
    if "apc" in inc and "attentions" not in inc:
        log.info("include has apc without attentions: only the APC maps are stored")
    return inc


def partial_paths(output: str | Path) -> tuple[Path, Path]:
    """``(<output>.partial, <output>.partial.journal)``: the file being written and its journal."""
    output = Path(output)
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    return partial, partial.with_name(partial.name + ".journal")


class _Journal:
    """``<output>.partial.journal``, JSON lines: the export's settings, then one line per input
    record handled, in input order, written after the record is flushed to the partial file:
    ``{"n", "id", "group", "checksum"}`` (stored; the CRC-32s of :func:`maps_io.record_checksum`)
    or ``{"n", "id", "skipped": true}`` (too long, ``crop=skip``). Each line is one ``write``; a
    line cut by a kill is ignored on reading."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self.add({"journal": 1, "settings": settings})

    def add(self, entry: dict) -> None:
        os.write(self._fd, (json.dumps(entry, default=str) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def read(path: Path, settings: dict, partial: Path) -> list[dict]:
        """The contiguous records ``n = 0, 1, ...`` a killed export finished (``[]`` when the
        journal is missing or unreadable); :class:`ExportError` when it ran with other settings."""
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s: journal unreadable (%s): the export starts from the beginning", path, e)
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written when the process was killed
                break
        if not entries or not isinstance(entries[0], dict) or "settings" not in entries[0]:
            log.warning("%s: no journal header: the export starts from the beginning", path)
            return []
        old = entries[0]["settings"]
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ExportError(f"{partial}: the interrupted export ran with other settings ({', '.join(diff)} differ); "
                              "rerun with the same settings and resume=true, or with overwrite=true to start again")
        done = []
        for e in entries[1:]:
            if not isinstance(e, dict) or e.get("n") != len(done):
                break
            done.append(e)
        return done


def _space_problem(e: BaseException) -> bool:
    """A write failed because the disk (or the file size limit) is full; h5py's errors carry the
    C library's errno only in their text."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(e)
    return any(m in text for m in ("No space left", "File too large", "Disk quota exceeded",
                                   f"errno = {errno.ENOSPC},", f"errno = {errno.EFBIG},"))


def _record_bytes(n_maps: int, depth: int, heads: int, length: int, dim: int, inc: Sequence[str]) -> int:
    """An upper bound of the bytes a record adds to the file: its maps uncompressed (deflate
    expands incompressible data by < 0.1 %), embeddings, and 64 KiB for HDF5 metadata."""
    maps = n_maps * depth * heads * length * length * 2
    emb = (4 * dim if "mean" in inc else 0) + (4 * length * dim if "per_token" in inc else 0)
    return int(1.01 * (maps + emb + length)) + (64 << 10)


def _room_for(path: Path, needed: int) -> tuple[bool, str]:
    """Whether ``needed`` more bytes fit on ``path``'s file system and under the file size limit
    (``ulimit -f``). Checked before each record, so that a full disk stops the export between
    records, with the partial file flushed and resumable, instead of failing inside HDF5 (whose
    file then cannot even be closed)."""
    import resource

    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        return False, f"{free / 2**20:.1f} MiB free, the next record needs up to {needed / 2**20:.1f} MiB"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and path.stat().st_size + needed > limit:
        return False, f"file size limit {limit / 2**20:.1f} MiB"
    return True, ""


def _check_output(output: Path) -> None:
    if output.is_dir():
        raise ExportError(f"{output}: is a directory; output= names the maps.h5 file to write")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"{parent}: is a file, but output={output} needs it to be a directory")
            if not os.access(parent, os.W_OK):
                raise ExportError(f"{parent}: not writable (permission denied); choose a writable output path")
            break


def export_attention(model: PerformerLM | LoadedModel, sequences: Iterable[SequenceRecord | tuple], output: str | Path,
                     include: Sequence[str] = ("attentions", "apc"), crop: str = "error",
                     max_sequences: int | None = None, checkpoint_sha256: str = "",
                     metadata: dict | None = None, progress: bool = True,
                     input_report: InputReport | None = None, resume: bool = False, overwrite: bool = False,
                     input_key: Any = None) -> dict:
    """Write the maps (and embeddings) of ``sequences`` to the HDF5 file ``output`` (maps_io layout).

    ``sequences``: :class:`SequenceRecord` s or ``(id, sequence, source)`` tuples. ``include``:
    any of ``attentions`` (every layer x head, float16), ``apc`` (``apc(symmetrize(A))`` of each
    map, float16), ``mean`` and ``per_token`` (final-layer embeddings, float32). ``input_report``:
    the reader's failures, stored in the ``export`` attribute. Returns a summary dict.

    Crash safety: the file is written under ``<output>.partial`` (carrying maps_io's
    ``incomplete`` marker) and renamed onto ``output`` only when complete, so ``output`` is either
    the previous file or the new complete one. After every record the partial file is flushed and
    a line is added to ``<output>.partial.journal``. A killed export leaves both; ``resume=True``
    continues it: the records the journal lists are checked against their CRC-32s and copied into
    a fresh partial file with the same HDF5 calls in the same order (then it replaces the old one),
    the input is read from the start with those records skipped, and the rest is computed. The
    result is byte-identical to an uninterrupted export (tests/test_crash_export.py). A damaged
    record (killed mid-flush) is recomputed from there on. The settings (model, checkpoint,
    include, crop, input: ``input_key``) must be the same; without ``resume`` an interrupted
    export is refused unless ``overwrite=True``. A failure other than a bad input keeps the
    partial file for ``resume``.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    lm: PerformerLM = loaded.model if loaded else model
    sha = checkpoint_sha256 or (loaded.sha256 if loaded else "")
    inc = _parse_include(include)
    if crop not in CROPS:
        raise ExportError(f"crop must be one of {CROPS}, got {crop!r}")
    output = Path(output)
    _check_output(output)
    cfg = lm.config
    causal = bool(cfg.causal)
    max_residues = int(cfg.max_len) - (1 if causal else 2)
    depth, heads = len(lm.blocks), int(cfg.heads)
    partial, journal_path = partial_paths(output)
    meta = {"checkpoint": loaded.checkpoint if loaded else "", "seed": loaded.seed if loaded else None,
            **(loaded.info if loaded else {}), "include": list(inc), "crop": crop, **(metadata or {})}
    settings = json.loads(json.dumps({"meta": meta, "model_config": asdict(cfg), "checkpoint_sha256": sha,
                                      "input": input_key}, default=str))
    done: list[dict] = []
    if partial.exists():
        if resume:
            done = _Journal.read(journal_path, settings, partial)
        elif not overwrite:
            raise ExportError(f"{partial}: an interrupted export of {output} is there; rerun with resume=true to "
                              "continue it, or overwrite=true to start again")
        else:
            log.warning("overwrite=true: the interrupted export %s is discarded", partial)
    elif resume:
        log.info("resume=true: no interrupted export at %s, starting from the beginning", partial)
    old = None
    if done:
        try:
            old = h5py.File(partial, "r")
        except OSError as e:  # killed before its first flush, or damaged: nothing to copy
            log.warning("%s: unreadable (%s): the export starts from the beginning", partial, _first_line(e))
            done = []
    resumed_partial, resumed_journal = partial_paths(output.with_name(output.name + ".resume"))
    target, target_journal = (resumed_partial, resumed_journal) if old is not None else (partial, journal_path)

    was_training = lm.training
    lm.eval()
    tok = Tokenizer(unknown="X")
    counts = {"records": 0, "cropped": 0, "skipped_too_long": 0, "residues": 0}
    skipped: list[str] = []
    n_copied = 0
    t0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    total = len(sequences) if hasattr(sequences, "__len__") else None
    if max_sequences is not None:
        total = min(total, max_sequences) if total is not None else max_sequences
    bar = tqdm(total=total, desc="export", unit="seq", disable=not progress) if tqdm else None
    writer = journal = None

    def caught_up() -> None:
        """The copied records are in the new partial file: it (and its journal) replace the old."""
        nonlocal old, target, target_journal
        if old is None:
            return
        old.close()
        old = None
        os.replace(target, partial)
        os.replace(target_journal, journal_path)
        target, target_journal = partial, journal_path
        log.info("resume: %d records kept from the interrupted export, computing the rest", n_copied)

    try:
        try:
            writer = MapsWriter(target, model_config=asdict(cfg), checkpoint_sha256=sha, causal=causal)
            journal = _Journal(target_journal, settings)
        except OSError as e:
            if _space_problem(e):
                raise
            raise ExportError(f"{target}: cannot be created ({_first_line(e)}); choose a writable output path") from e
        for n, rec in enumerate(sequences):
            if max_sequences is not None and counts["records"] >= max_sequences:
                break
            rec = rec if isinstance(rec, SequenceRecord) else SequenceRecord(*rec)
            if old is not None and n < len(done) and done[n].get("id") == rec.id:
                entry = done[n]
                if entry.get("skipped"):
                    counts["skipped_too_long"] += 1
                    skipped.append(rec.id)
                    journal.add(entry)
                    continue
                src = _intact(old, entry)
                if src is not None:
                    n_maps = sum(w in src for w in ("attentions", "apc"))
                    _ensure_room(target, output,
                                 _record_bytes(n_maps, depth, heads, len(src["tokens"]), int(cfg.dim), inc))
                    copy = writer.copy_record(src)
                    writer.flush()
                    journal.add({**entry, "checksum": copy.checksum})
                    counts["cropped"] += int("crop_start" in src.attrs)
                    counts["records"] += 1
                    counts["residues"] += copy.length
                    n_copied += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                log.warning("%s: record %d (%s) was damaged by the interruption: computing from there on",
                            partial, n, rec.id)
            caught_up()
            where = f"{rec.source or output.name} record {rec.id}"
            if not rec.sequence:
                raise ExportError(f"{where}: empty sequence")
            residues = tok.encode(rec.sequence)
            full_length = len(residues)
            window = crop_window(len(residues), max_residues, crop, where)
            if window is None:
                counts["skipped_too_long"] += 1
                skipped.append(rec.id)
                journal.add({"n": n, "id": rec.id, "skipped": True})
                log.warning("%s: %d residues > %d (max_len %d): skipped", where, len(residues), max_residues, cfg.max_len)
                continue
            start, stop = window
            residues = residues[start:stop]
            seq = tok.decode(residues)
            cropped = stop - start != full_length
            _ensure_room(target, output, _record_bytes(
                ("attentions" in inc) + ("apc" in inc), depth, heads, len(residues), int(cfg.dim), inc))
            # the record is dropped on any error: no half-written record stays behind
            with writer.begin_layers(rec.id, seq, depth, heads, tokens=residues.astype(np.uint8),
                                     source=rec.source, attentions="attentions" in inc, apc="apc" in inc,
                                     attrs={"crop_start": start, "full_length": full_length} if cropped else None,
                                     ) as record:
                _write_record(lm, record, residues, inc)
            writer.flush()
            journal.add({"n": n, "id": rec.id, "group": record.name, "checksum": record.checksum})
            counts["cropped"] += int(cropped)
            counts["records"] += 1
            counts["residues"] += len(residues)
            if bar is not None:
                bar.update(1)
        caught_up()
        failures = input_report.failures if input_report is not None else []
        writer.set_attr("export", json.dumps({**meta, **counts, "skipped": skipped, "input_failures": failures},
                                             default=str))
        writer.close()
        publish(partial, output)
        journal.close()
        journal_path.unlink(missing_ok=True)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if journal is not None:
            journal.close()
        if old is not None:
            old.close()
        if isinstance(e, _NoSpace):  # stopped between records: the partial file is flushed and resumable
            raise
        if isinstance(e, ValueError) and not _space_problem(e):  # a bad input or setting: nothing to resume
            for p in (target, target_journal):
                p.unlink(missing_ok=True)
            raise
        if _space_problem(e):
            raise ExportError(_no_space_message(target, output)) from e
        if target.exists():
            log.error("export of %s interrupted after %d records (%s); rerun with resume=true to continue",
                      output, counts["records"], _first_line(e))
        raise
    finally:
        if bar is not None:
            bar.close()
        lm.train(was_training)
    seconds = time.perf_counter() - t0
    summary = {"output": str(output), **counts, "skipped": skipped, "seconds": round(seconds, 3),
               "layers": depth, "heads": heads, "causal": causal, "include": list(inc), "checkpoint_sha256": sha,
               "resumed_records": n_copied}
    log.info("exported %d sequences (%d residues, %d cropped, %d skipped; %d kept from an interrupted export) "
             "to %s in %.1f s", counts["records"], counts["residues"], counts["cropped"], counts["skipped_too_long"],
             n_copied, output, seconds)
    return summary


def _no_space_message(target: Path, output: Path, detail: str = "") -> str:
    return (f"{target}: no space left on the device (or the file size limit reached) while writing {output}"
            f"{f' ({detail})' if detail else ''}; free space and rerun with resume=true")


class _NoSpace(ExportError):
    """The next record would not fit: raised between records, the partial file stays resumable."""


def _ensure_room(target: Path, output: Path, needed: int) -> None:
    ok, detail = _room_for(target, needed)
    if not ok:
        raise _NoSpace(_no_space_message(target, output, detail))


def _intact(old: h5py.File, entry: dict) -> h5py.Group | None:
    """The group of a journal entry in the interrupted file if its content matches the checksum."""
    try:
        src = old[entry["group"]]
        if record_checksum(src) == entry["checksum"]:
            return src
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:  # h5py on damaged metadata
        log.debug("record %s unreadable: %s", entry.get("id"), e)
    return None


def _write_record(lm: PerformerLM, record: LayerRecord, residues: np.ndarray, inc: tuple[str, ...]) -> None:
    """Run one sequence through ``lm``, handing each layer's maps to ``record`` as the layer's hook
    produces them (one layer in memory), then the final-layer embeddings."""

    def on_layer(layer: int, maps: torch.Tensor) -> None:
        record.write_layer(maps.float().cpu().numpy())  # (h, L, L); run_sequence calls layers 0, 1, ... in order

    want_maps = "attentions" in inc or "apc" in inc
    want_repr = "mean" in inc or "per_token" in inc
    rep = run_sequence(lm, residues, on_layer if want_maps else None, want_repr)
    if want_repr:
        rep = rep.float().cpu().numpy()  # (L, dim)
        record.add_embeddings(mean=rep.mean(0) if "mean" in inc else None,
                              per_token=rep if "per_token" in inc else None)


def input_key(input: str | Path) -> dict:
    """What identifies the input for ``resume``: the path and the size and modification time of
    the file (or of each structure file of a folder)."""
    path = Path(input)

    def sig(p: Path) -> list:
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]

    if path.is_dir():
        return {"path": str(input), "files": [sig(p) for p in sorted(path.iterdir()) if p.is_file()]}
    return {"path": str(input), "file": sig(path)}


def run_export(checkpoint: str, input: str, output: str, include: Sequence[str] = ("attentions", "apc"),
               model_config: dict | str | None = None, seed: int = 0, crop: str = "error",
               max_sequences: int | None = None, min_residues: int = 30, invalid: str = "error",
               device: str = "cpu", progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """What ``python -m protein_performer.export_attention`` does: load, read, export. Returns the
    summary (with ``input_failures``: structure files / chains / FASTA records left out).
    ``resume`` / ``overwrite``: an interrupted export (see :func:`export_attention`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not Path(input).exists():
        raise MissingFileError(f"input not found: {input}")
    _check_output(Path(output))
    loaded = load_model(checkpoint, model_config, seed, device)
    report = InputReport()
    seqs = read_sequences(input, min_residues=min_residues, invalid=invalid, report=report)
    if is_structure_input(input):
        seqs = list(seqs)  # a few chains: read them all first, so the progress bar knows the total
    summary = export_attention(loaded, seqs, output, include=include, crop=crop, max_sequences=max_sequences,
                               metadata={"input": str(input)}, progress=progress, input_report=report,
                               resume=resume, overwrite=overwrite, input_key=input_key(input))
    summary["input_failures"] = report.failures
    return summary
