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
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from protein_performer.analysis.maps_io import LayerRecord, MapsWriter
from protein_performer.data.tokenizer import Tokenizer, UnknownResidueError
from protein_performer.model.performer import PerformerConfig, PerformerLM

log = logging.getLogger(__name__)

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
            raise ValueError(f"{path}: not a readable PyTorch / Lightning checkpoint ({e2})") from e2


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
        raise ValueError(f"{where}: model config keys {unknown} are not PerformerLM arguments ({sorted(known)})")
    return cfg


def model_config_from(source: dict | str | Path) -> dict:
    """PerformerLM kwargs from a dict, a Lightning checkpoint (``hyper_parameters["model"]``) or a
    YAML / JSON file holding them (a ``_target_`` key is ignored)."""
    if isinstance(source, dict) or not isinstance(source, (str, Path)):
        return _check_config(dict(_plain(source)), "model_config")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"model_config: no such file {path}")
    if path.suffix in (".yaml", ".yml", ".json"):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            cfg = cfg["model"]
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: expected a mapping of PerformerLM arguments")
        return _check_config(cfg, str(path))
    return _config_from_checkpoint(_torch_load(path), path)


def _config_from_checkpoint(ckpt: dict, path: Path) -> dict:
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    cfg = hp.get("model") if isinstance(hp, dict) else None
    if not isinstance(cfg, dict) and cfg is not None:
        cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the checkpoint stores no model config in hyper_parameters['model'] "
                         "(train with protein_performer.training.ProteinLM, or pass model_config=)")
    return _check_config(cfg, str(path))


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
            raise ValueError("checkpoint=random needs model_config= (a trained checkpoint, a YAML file or a dict) "
                             "for the architecture")
        cfg = model_config_from(model_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = PerformerLM(**cfg)
        log.info("random-init model (seed %d): %s", seed, {k: cfg.get(k) for k in ("attention", "depth", "heads", "dim")})
        return LoadedModel(model.to(device).eval().requires_grad_(False), RANDOM, "", int(seed),
                           {"source": str(model_config) if not isinstance(model_config, dict) else "dict"})
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    cfg = _config_from_checkpoint(ckpt, path) if model_config is None else model_config_from(model_config)
    model = PerformerLM(**cfg)
    state = ckpt["state_dict"]
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model config {cfg}: {e}") from e
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
        raise ValueError(f"invalid must be 'error' or 'skip', got {invalid!r}")
    report = report if report is not None else InputReport()
    path = Path(input)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if is_structure_input(path):
        from protein_performer.analysis.structures import load_structures

        chains, failures = load_structures(path, min_residues=min_residues)
        for f in failures:
            report.failures.append({"source": f"{f.source}:{f.chain}" if f.chain else f.source, "reason": f.reason})
        if not chains:
            raise ValueError(f"{path}: no protein chain with >= {min_residues} standard residues found")
        for c in chains:
            yield SequenceRecord(c.name, c.sequence, c.key)
        return
    from protein_performer.data.fasta import read_fasta

    tok = Tokenizer()
    for rec in read_fasta(path):
        header = rec.header.decode("ascii", errors="replace").strip()
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
                raise ValueError(msg + " (set invalid=skip to leave such records out)")
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
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if length <= max_residues:
        return 0, length
    if crop == "error":
        raise ValueError(f"{record}: {length} residues do not fit the model's max_len ({max_residues} residues "
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
        raise ValueError(f"include must be a non-empty subset of {INCLUDE}, got {list(inc)}")
    if "apc" in inc and "attentions" not in inc:
        log.info("include has apc without attentions: only the APC maps are stored")
    return inc


def export_attention(model: PerformerLM | LoadedModel, sequences: Iterable[SequenceRecord | tuple], output: str | Path,
                     include: Sequence[str] = ("attentions", "apc"), crop: str = "error",
                     max_sequences: int | None = None, checkpoint_sha256: str = "",
                     metadata: dict | None = None, progress: bool = True,
                     input_report: InputReport | None = None) -> dict:
    """Write the maps (and embeddings) of ``sequences`` to the HDF5 file ``output`` (maps_io layout).

    ``sequences``: :class:`SequenceRecord` s or ``(id, sequence, source)`` tuples. ``include``:
    any of ``attentions`` (every layer x head, float16), ``apc`` (``apc(symmetrize(A))`` of each
    map, float16), ``mean`` and ``per_token`` (final-layer embeddings, float32). The file is
    written under ``<output>.partial`` and renamed when complete. ``input_report``: the reader's
    failures, stored in the ``export`` attribute. Returns a summary dict.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    lm: PerformerLM = loaded.model if loaded else model
    sha = checkpoint_sha256 or (loaded.sha256 if loaded else "")
    inc = _parse_include(include)
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    was_training = lm.training
    lm.eval()
    cfg = lm.config
    causal = bool(cfg.causal)
    max_residues = int(cfg.max_len) - (1 if causal else 2)
    depth, heads = len(lm.blocks), int(cfg.heads)
    tok = Tokenizer(unknown="X")
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    meta = {"checkpoint": loaded.checkpoint if loaded else "", "seed": loaded.seed if loaded else None,
            **(loaded.info if loaded else {}), "include": list(inc), "crop": crop, **(metadata or {})}
    counts = {"records": 0, "cropped": 0, "skipped_too_long": 0, "residues": 0}
    skipped: list[str] = []
    t0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    total = len(sequences) if hasattr(sequences, "__len__") else None
    if max_sequences is not None:
        total = min(total, max_sequences) if total is not None else max_sequences
    bar = tqdm(total=total, desc="export", unit="seq", disable=not progress) if tqdm else None
    try:
        with MapsWriter(partial, model_config=asdict(cfg), checkpoint_sha256=sha, causal=causal) as writer:
            for rec in sequences:
                if max_sequences is not None and counts["records"] >= max_sequences:
                    break
                rec = rec if isinstance(rec, SequenceRecord) else SequenceRecord(*rec)
                where = f"{rec.source or output.name} record {rec.id}"
                if not rec.sequence:
                    raise ValueError(f"{where}: empty sequence")
                residues = tok.encode(rec.sequence)
                full_length = len(residues)
                window = crop_window(len(residues), max_residues, crop, where)
                if window is None:
                    counts["skipped_too_long"] += 1
                    skipped.append(rec.id)
                    log.warning("%s: %d residues > %d (max_len %d): skipped", where, len(residues), max_residues, cfg.max_len)
                    continue
                start, stop = window
                residues = residues[start:stop]
                seq = tok.decode(residues)
                cropped = stop - start != full_length
                # the record is dropped on any error: no half-written record stays behind
                with writer.begin_layers(rec.id, seq, depth, heads, tokens=residues.astype(np.uint8),
                                         source=rec.source, attentions="attentions" in inc, apc="apc" in inc,
                                         attrs={"crop_start": start, "full_length": full_length} if cropped else None,
                                         ) as record:
                    _write_record(lm, record, residues, inc)
                counts["cropped"] += int(cropped)
                counts["records"] += 1
                counts["residues"] += len(residues)
                if bar is not None:
                    bar.update(1)
            failures = input_report.failures if input_report is not None else []
            writer.set_attr("export", json.dumps({**meta, **counts, "skipped": skipped, "input_failures": failures},
                                                 default=str))
        partial.replace(output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        lm.train(was_training)
    seconds = time.perf_counter() - t0
    summary = {"output": str(output), **counts, "skipped": skipped, "seconds": round(seconds, 3),
               "layers": depth, "heads": heads, "causal": causal, "include": list(inc), "checkpoint_sha256": sha}
    log.info("exported %d sequences (%d residues, %d cropped, %d skipped) to %s in %.1f s", counts["records"],
             counts["residues"], counts["cropped"], counts["skipped_too_long"], output, seconds)
    return summary


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


def run_export(checkpoint: str, input: str, output: str, include: Sequence[str] = ("attentions", "apc"),
               model_config: dict | str | None = None, seed: int = 0, crop: str = "error",
               max_sequences: int | None = None, min_residues: int = 30, invalid: str = "error",
               device: str = "cpu", progress: bool = True) -> dict:
    """What ``python -m protein_performer.export_attention`` does: load, read, export. Returns the
    summary (with ``input_failures``: structure files / chains / FASTA records left out)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(checkpoint, model_config, seed, device)
    report = InputReport()
    seqs = read_sequences(input, min_residues=min_residues, invalid=invalid, report=report)
    if is_structure_input(input):
        seqs = list(seqs)  # a few chains: read them all first, so the progress bar knows the total
    summary = export_attention(loaded, seqs, output, include=include, crop=crop, max_sequences=max_sequences,
                               metadata={"input": str(input)}, progress=progress, input_report=report)
    summary["input_failures"] = report.failures
    return summary
