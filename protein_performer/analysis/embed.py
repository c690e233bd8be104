"""Per-sequence embeddings at scale: no attention maps, batches of similar length, resumable.

The embedding of a sequence is the mean over its residues (special tokens excluded) of the final
representation (after the last LayerNorm), the vector ``export_attention include=[mean]`` stores.
Sequences are read in chunks; inside a chunk they are sorted by length and packed into batches of
at most ``batch_tokens`` padded tokens, so little compute goes to padding; padded keys are
masked out of attention (FAVOR+ and exact alike), so a sequence's embedding does not depend on its
batch.

Output (HDF5, rows in input order)::

    /ids       str     (n,)        the FASTA header's first word (or <structure>_<chain>)
    /lengths   int32   (n,)        residues embedded (after ``crop``)
    /mean      float32 (n, dim)
    attrs      format_version, checkpoint, checkpoint_sha256, model_config (json), input, crop,
               progress (input records consumed, rows written); ``complete`` once finished

The file is written as ``<output>.partial`` and renamed when complete (a rerun leaves the finished
file as it was until then); ``resume=true`` continues a killed run after its last committed chunk,
and over a finished file made with the same settings (its ``run_settings`` attribute, see
:mod:`protein_performer.analysis.rerun`) does nothing. A chunk is committed in two steps: its rows are
appended and flushed, and only then is ``progress`` (one attribute: input records consumed,
``crop=skip`` ones included, and rows written) set and flushed. HDF5 writes what a flush holds in
no particular order, so a kill inside the first flush can leave new rows half written but never a
mark that counts them; a resumed run cuts the datasets back to the rows ``progress`` counts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from protein_performer.analysis import rerun
from protein_performer.analysis.export import InputReport, SequenceRecord, crop_window, read_sequences
from protein_performer.analysis.runs import as_records, check_run_paths, resolve_device
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import IncompleteOutputError, UserError
from protein_performer.outputs_h5 import ResumableH5
from protein_performer.pretrained import LoadedModel, load_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_CHUNK = 4096  # sequences read, sorted and written at a time (one flush each)
DEFAULT_BATCH_TOKENS = 16384  # padded tokens per forward pass
DATASETS = ("ids", "lengths", "mean")
PROGRESS_ATTR = "progress"  # the commit mark: (input records consumed, rows written)
COMPLETE_ATTR = "complete"


def length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices into ``lengths`` grouped into batches: sorted by length, each batch holding at most
    ``batch_tokens`` padded tokens (``len(batch) * max length``; a longer sequence alone)."""
    order = np.argsort(lengths, kind="stable")
    batches, cur, cur_max = [], [], 0
    for idx in order:
        n = int(lengths[idx])
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            batches.append(np.array(cur))
            cur, cur_max = [], 0
        cur.append(int(idx))
        cur_max = max(cur_max, n)
    if cur:
        batches.append(np.array(cur))
    return batches


def _batch_tokens(residues: list[np.ndarray], causal: bool, tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Each residue array's :meth:`Tokenizer.frame`, padded to one length, and the padding mask."""
    T = max(len(r) for r in residues) + tok.special_tokens(causal)
    tokens = np.full((len(residues), T), tok.pad_id, dtype=np.int64)
    for n, r in enumerate(residues):
        ids, _ = tok.frame(r, causal)
        tokens[n, : len(ids)] = ids
    tokens_t = torch.from_numpy(tokens)
    return tokens_t, tokens_t == tok.pad_id


@torch.no_grad()
def embed_batch(model, residues: list[np.ndarray], device: str | torch.device = "cpu") -> np.ndarray:
    """(n, dim) float32 mean embeddings of residue-id arrays (no special tokens), one forward pass."""
    tok = Tokenizer()
    tokens, pad = _batch_tokens(residues, bool(model.config.causal), tok)
    tokens, pad = tokens.to(device), pad.to(device)
    rep = model.representations(tokens, pad if pad.any() else None).float()  # (n, T, dim)
    where = [tok.residue_slice(len(r)) for r in residues]  # the residues' positions in each frame
    starts = torch.tensor([w.start for w in where], device=rep.device)
    stops = torch.tensor([w.stop for w in where], device=rep.device)
    lengths = stops - starts
    pos = torch.arange(rep.shape[1], device=rep.device)
    keep = (pos[None] >= starts[:, None]) & (pos[None] < stops[:, None])
    summed = (rep * keep[..., None]).sum(1)
    return (summed / lengths[:, None]).cpu().numpy()


def embed_sequences(
    model: LoadedModel | torch.nn.Module,
    sequences: Iterable[str | tuple | SequenceRecord],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    chunk: int = DEFAULT_CHUNK,
    crop: str = "error",
    device: str | torch.device | None = None,
) -> Iterator[tuple[str, int, np.ndarray]]:
    """``(id, residues embedded, mean embedding (dim,))`` per sequence, in input order (the Python API)."""
    lm = model.model if isinstance(model, LoadedModel) else model
    device = device if device is not None else next(lm.parameters()).device
    for chunk_records in _chunks(as_records(sequences), chunk):
        ids, lengths, emb = _embed_chunk(lm, chunk_records, batch_tokens, crop, device)
        for k in range(len(ids)):
            if lengths[k] > 0:
                yield ids[k], int(lengths[k]), emb[k]


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _embed_chunk(
    lm, records: list[SequenceRecord], batch_tokens: int, crop: str, device
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embeddings of one chunk, rows in the chunk's order; a record skipped by ``crop=skip`` gets
    length 0 and a NaN row."""
    tok = Tokenizer()
    max_res = int(lm.config.max_len) - tok.special_tokens(bool(lm.config.causal))
    residues = []
    for rec in records:
        r = tok.encode(rec.sequence)
        w = crop_window(len(r), max_res, crop, rec.id)
        residues.append(r[w[0] : w[1]] if w is not None else r[:0])
    lengths = np.array([len(r) for r in residues], dtype=np.int32)
    dim = int(lm.config.dim)
    out = np.full((len(records), dim), np.nan, dtype=np.float32)
    live = np.nonzero(lengths > 0)[0]
    for b in length_batches(lengths[live], batch_tokens):
        idx = live[b]
        out[idx] = embed_batch(lm, [residues[i] for i in idx], device)
    return [r.id for r in records], lengths, out


def read_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """``{"ids", "lengths", "mean"}`` of a complete embeddings file (an incomplete one is refused)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: embeddings file not found")
    with h5py.File(path, "r") as h5:
        if not h5.attrs.get(COMPLETE_ATTR, False):
            raise IncompleteOutputError(
                f"{path}: incomplete: the embedding run was interrupted; rerun with resume=true"
            )
        return {
            "ids": np.array([x.decode() if isinstance(x, bytes) else x for x in h5["ids"][()]], dtype=object),
            "lengths": h5["lengths"][()],
            "mean": h5["mean"][()],
        }


def _resume_point(run: ResumableH5, settings: dict) -> tuple[int, int]:
    """``(input records consumed, rows kept)`` of the last committed chunk, where a resumed run
    continues; ``(0, 0)``: start afresh (nothing to resume, or no commit mark it can trust)."""
    if not run.resumes(settings, lambda h5: {k: h5.attrs.get(k) for k in settings}):
        return 0, 0
    try:
        with h5py.File(run.partial, "r") as h5:
            done, kept = (int(x) for x in h5.attrs.get(PROGRESS_ATTR, (-1, -1)))
            n_rows = min(h5[name].shape[0] for name in DATASETS)
    except (OSError, KeyError):
        return 0, 0  # killed while its header was written: start again
    if kept < 0 or kept > n_rows:  # no commit mark it can trust: start again
        log.warning(
            "%s: no consistent progress mark (%d rows written, %d stored); starting again", run.partial, kept, n_rows
        )
        return 0, 0
    return done, kept


def _new_file(h5: h5py.File, settings: dict, checkpoint: str, chunk: int, dim: int) -> None:
    """The header and the empty, growable datasets of a new embeddings file."""
    for k, v in settings.items():
        h5.attrs[k] = v
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["checkpoint"] = str(checkpoint)
    h5.attrs[PROGRESS_ATTR] = np.zeros(2, dtype=np.int64)
    h5.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(chunk,))
    h5.create_dataset("lengths", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,))
    h5.create_dataset("mean", shape=(0, dim), maxshape=(None, dim), dtype=np.float32, chunks=(min(chunk, 1024), dim))


def _append_rows(h5: h5py.File, ids: list[str], lengths: np.ndarray, emb: np.ndarray, keep: np.ndarray) -> int:
    """Append the kept rows of one chunk to ``ids``, ``lengths`` and ``mean``; returns their count."""
    n_keep = int(keep.sum())
    n0 = h5["ids"].shape[0]
    for name, data in (("ids", np.array(ids, dtype=object)[keep]), ("lengths", lengths[keep]), ("mean", emb[keep])):
        h5[name].resize(n0 + n_keep, axis=0)
        h5[name][n0:] = data
    return n_keep


@dataclass
class EmbedSummary:
    """What :func:`run_embed` wrote."""

    output: str
    sequences: int  # rows in the file
    new: int  # rows this run computed
    seconds: float
    sequences_per_s: float
    input_failures: list[dict] = field(default_factory=list)  # records left out, with the reason
    already_complete: bool = False  # resume=true over a finished output: nothing was done


def run_embed(
    checkpoint: str,
    input: str,
    output: str,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    chunk: int = DEFAULT_CHUNK,
    crop: str = "error",
    min_residues: int = 30,
    invalid: str = "error",
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    model_config: str | None = None,
    seed: int = 0,
) -> EmbedSummary:
    """What ``python -m protein_performer.embed`` does; returns its :class:`EmbedSummary`."""
    t0 = time.perf_counter()
    device = resolve_device(device)
    run = check_run_paths(input, output, "embed", resume, overwrite)
    out = run.output
    options = {"command": "embed", "crop": crop, "chunk": int(chunk), "min_residues": min_residues, "invalid": invalid}

    def run_settings(sha: str | None = None) -> dict:
        return rerun.run_settings(checkpoint, model_config, seed, input, sha, **options)

    if rerun.finished_output(
        out, run.partial, run_settings, resume, overwrite, lambda h5: bool(h5.attrs.get(COMPLETE_ATTR))
    ):
        return _finished_summary(out, time.perf_counter() - t0)
    loaded = load_model(checkpoint, model_config, seed, device)
    lm = loaded.model
    settings = {
        "checkpoint_sha256": loaded.sha256,
        "input": str(input),
        "crop": crop,
        "chunk": int(chunk),
        "model_config": json.dumps(asdict(lm.config), sort_keys=True),
    }
    start_row, kept = _resume_point(run, settings)
    report = InputReport()
    t0 = time.perf_counter()
    n_new = 0
    from tqdm.auto import tqdm

    with run.open(resumed=start_row > 0) as h5:
        if start_row == 0:
            _new_file(h5, settings, checkpoint, chunk, int(lm.config.dim))
        else:
            for name in DATASETS:  # rows past the last committed chunk are dropped
                h5[name].resize(kept, axis=0)
            log.info("resuming after %d sequences (%d embeddings)", start_row, kept)
        records = read_sequences(input, min_residues=min_residues, invalid=invalid, report=report)
        bar = tqdm(disable=not progress, unit="seq", desc="embed", initial=start_row)
        row = 0
        for chunk_records in _chunks(records, chunk):
            if row + len(chunk_records) <= start_row:
                row += len(chunk_records)
                continue
            ids, lengths, emb = _embed_chunk(lm, chunk_records, batch_tokens, crop, device)
            keep = lengths > 0
            for k in np.nonzero(~keep)[0]:
                report.failures.append(
                    {"source": chunk_records[k].source, "reason": f"{ids[k]}: too long, skipped (crop=skip)"}
                )
            n_new += _append_rows(h5, ids, lengths, emb, keep)
            row += len(chunk_records)
            # the rows first, then the mark that counts them (see the module docstring)
            run.commit(h5, h5, PROGRESS_ATTR, np.array([row, h5["ids"].shape[0]], dtype=np.int64))
            bar.update(len(chunk_records))
        bar.close()
        n_total = h5["ids"].shape[0]
        run.complete(h5.attrs, run_settings(loaded.sha256), COMPLETE_ATTR)
    run.publish()
    seconds = time.perf_counter() - t0
    summary = EmbedSummary(
        str(out), n_total, n_new, seconds, n_new / seconds if seconds > 0 else float("nan"), report.failures
    )
    log.info("%d embeddings (%d new) -> %s in %.1f s", n_total, n_new, out, seconds)
    return summary


def _finished_summary(out: Path, seconds: float) -> EmbedSummary:
    """:func:`run_embed`'s summary of a finished file (``resume=true`` over it): nothing new."""
    with h5py.File(out, "r") as h5:
        n = int(h5["ids"].shape[0])
    log.info("%s is already complete (%d records); nothing to do", out, n)
    return EmbedSummary(str(out), n, 0, seconds, 0.0, [], already_complete=True)
