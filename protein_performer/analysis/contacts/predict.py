"""Contact maps for any sequence: a trained model's attention maps through a saved contact head.

    predictions = predict_contacts(load_model("last.ckpt"), ContactHead.load("contact_head.json"),
                                   ["MKTAYIAKQR...", ("my_protein", "MSEQ...")])
    for pred in predictions: pred.id, pred.sequence, pred.contacts   # (L, L) float32 probabilities

The features are exactly those the ``contacts`` step fits on: every layer's maps (the layer's
``attention_matrix``, special tokens dropped), symmetrized, APC-corrected and rounded to float16
as ``export_attention`` stores them, computed in row tiles from the layers' features
(:mod:`~protein_performer.analysis.contacts.tiles`: no layers x heads x L x L stack). Sequences
longer than ``dense_max`` get their top pairs only (``top`` x L of them), never an L x L map; a
model with rotary positions reads sequences of any length whole (``crop`` applies to learned
positions).

A model trained on rows aligned to one reference chain (the family-contacts recipe's
``align=true``: its positions are the reference's residues) predicts through that frame: each
input is aligned onto the reference (global, BLOSUM62), the model reads the aligned row (``X``
where the input covers no reference residue), and the reference-frame probabilities are mapped
back onto the input's residues; residues aligned to no reference position get probability 0.
The head of such a model names its reference (``ContactHead.align_to``), so this happens without
being asked; ``align_to=`` sets or turns off the reference.

Output file (:func:`run_predict_contacts`), HDF5::

    /                      attrs: format_version, checkpoint, checkpoint_sha256, head (path), head_sha256,
                                  align_to (the reference sequence, "" for none),
                                  complete (absent while the file is being written: ``<output>.partial``)
    /<sanitized id>/       attrs: id, sequence, index (0-based position in the input), done
        contacts           float16 (L, L), symmetric, 0 on the diagonal (L <= dense_max), or for longer ones
        top_pairs          int32 (k, 2): the k = top x L most probable pairs (i, j), 0-based, j - i >= min_sep
        top_probabilities  float32 (k,): their probabilities, largest first
        aligned            int32 (n,): the input residues (0-based) on the reference (with align_to only)

The file is written as ``<output>.partial`` and renamed when complete (a rerun leaves the finished
file as it was until then; ``csv=`` and the PNGs are then written, each atomically); ``resume=true``
continues a killed run from the records already in the partial file, and over a finished file made
with the same settings (its ``run_settings`` attribute, see :mod:`protein_performer.analysis.rerun`)
does nothing but write a missing ``csv=`` / PNG from it.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from protein_performer.analysis import rerun
from protein_performer.analysis.alignment import aligned_positions
from protein_performer.analysis.contacts import potts
from protein_performer.analysis.contacts.head import ContactHead
from protein_performer.analysis.contacts.plot import plot_prediction
from protein_performer.analysis.contacts.tiles import (
    dense_probabilities,
    iter_layer_tiles,
    layer_tiles,
    top_probabilities,
)
from protein_performer.analysis.export import InputReport, SequenceRecord, crop_window, read_sequences, run_sequence
from protein_performer.analysis.maps import apc_maps, sanitize_name
from protein_performer.analysis.runs import as_records, check_run_paths, resolve_device
from protein_performer.data.tokenizer import Tokenizer, UnknownResidueError
from protein_performer.errors import IncompleteOutputError, UserError
from protein_performer.outputs import atomic_output
from protein_performer.outputs_h5 import ResumableH5
from protein_performer.pretrained import LoadedModel, file_sha256, load_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE_ATTR = "complete"
DONE_ATTR = "done"  # a record group's commit mark
DENSE_MAX = 4096  # longer sequences: top pairs only (an L x L float16 map is 32 MB at 4096)


@dataclass
class ContactPrediction:
    id: str
    sequence: str
    contacts: np.ndarray | None  # (L, L) float32 probabilities (None: top pairs only)
    start: int = 0  # residues [start, start + L) of the input sequence (crop)
    aligned: np.ndarray | None = None  # with align_to: the input residues (0-based) on the reference
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (i, j, p), 0-based, without ``contacts``

    def top_pairs(self, k: int | None = None, min_sep: int = 6) -> list[tuple[int, int, float]]:
        """The ``k`` (default L) most probable pairs ``i < j`` with ``j - i >= min_sep``, as 1-based
        positions of the input sequence with their probability, most probable first."""
        L = len(self.sequence)
        k = L if k is None else int(k)
        if self.contacts is None:  # stored most probable first (min_sep: the head's)
            i, j, p = self.pairs
            order = np.flatnonzero(j - i >= min_sep)[:k]
            return [(int(i[o]) + 1 + self.start, int(j[o]) + 1 + self.start, float(p[o])) for o in order]
        i, j = np.triu_indices(L, k=min_sep)
        p = self.contacts[i, j]
        order = np.argsort(-p, kind="stable")[:k]
        return [(int(i[o]) + 1 + self.start, int(j[o]) + 1 + self.start, float(p[o])) for o in order]


def _model_of(model: LoadedModel | torch.nn.Module):
    return model.model if isinstance(model, LoadedModel) else model


def contact_features(model, residues: np.ndarray) -> np.ndarray:
    """(layers, heads, L, L) float16: the APC-corrected symmetrized maps of every layer, as
    ``export_attention`` stores them (``include=[apc]``) and ``contacts`` reads them."""
    layers: list[np.ndarray] = []

    def on_layer(layer: int, maps: torch.Tensor) -> None:
        layers.append(apc_maps(maps.float().cpu().numpy()).astype(np.float16))

    run_sequence(_model_of(model), residues, on_layer)
    return np.stack(layers)


def reference_sequence(head: ContactHead, align_to: str | bool | None = None) -> str | None:
    """The sequence inputs are aligned onto: ``align_to`` when it is one (a sequence, or a FASTA
    file's first record), the head's reference when ``None`` (``True``: the head must name one),
    none when ``False``. The one place ``align_to`` is read; the command line's words for "none"
    become ``False`` there (``cli/predict_contacts``)."""
    if align_to is None or align_to is True:
        ref = str(head.align_to.get("sequence", "")) if head.align_to else ""
        if align_to is True and not ref:
            raise UserError("align_to=true: the contact head names no reference; give align_to=<sequence or FASTA>")
        return ref or None
    if align_to is False:
        return None
    text = str(align_to).strip()
    if not text:
        raise UserError("align_to: empty; give a sequence or a FASTA file (False: no reference)")
    try:
        is_file = Path(text).is_file()
    except OSError:  # a sequence too long to be a file name
        is_file = False
    if is_file:
        records = list(read_sequences(text, min_residues=1))
        if not records:
            raise UserError(f"align_to={text}: no sequence in the file")
        return records[0].sequence
    return text.upper()


def predict_contacts(
    model: LoadedModel | torch.nn.Module,
    head: ContactHead,
    sequences: Iterable[str | tuple | SequenceRecord],
    crop: str = "error",
    check_checkpoint: bool = True,
    align_to: str | bool | None = None,
    dense_max: int | None = DENSE_MAX,
    top: float = 1.0,
) -> Iterator[ContactPrediction]:
    """Contact probabilities for each sequence (a string, an ``(id, sequence)`` pair or a
    :class:`SequenceRecord`), in input order. ``crop``: what to do with a sequence longer than the
    model's positions allow (``error`` | ``skip`` | ``start`` | ``center``; see export's ``crop``).
    ``check_checkpoint``: refuse a head fitted on another checkpoint (needs a :class:`LoadedModel`).
    ``align_to``: the reference whose residues the model's positions are (see the module
    docstring; default: the head's, if it names one); with it ``crop`` does not apply. Sequences
    longer than ``dense_max`` (None: no limit) get ``top`` x L pairs instead of the map."""
    if isinstance(model, potts.LoadedPotts):
        yield from _predict_potts(model, head, sequences, check_checkpoint, align_to)
        return
    lm = _model_of(model)
    cfg = lm.config
    if check_checkpoint and isinstance(model, LoadedModel):
        head.check_model(model.sha256, cfg.depth, cfg.heads, where=model.checkpoint)
    elif (cfg.depth, cfg.heads) != (head.n_layers, head.n_heads):
        head.check_model(head.checkpoint_sha256, cfg.depth, cfg.heads)
    tok = Tokenizer()
    max_residues = int(cfg.max_len) - tok.special_tokens(bool(cfg.causal))
    if cfg.positions == "rotary" and cfg.qk == "content":  # nothing in the model is tied to a length
        max_residues = np.iinfo(np.int64).max
    reference = reference_sequence(head, align_to)
    if reference is not None:
        try:
            ref_residues = tok.encode(reference)
        except UnknownResidueError as e:
            raise UserError(f"align_to: {e}; give the reference's amino-acid letters") from e
        if len(ref_residues) > max_residues:
            raise UserError(f"align_to: the reference has {len(ref_residues)} residues, the model holds {max_residues}")
    for rec in as_records(sequences):
        residues = _residues(rec, tok)
        if reference is not None:
            yield _predict_aligned(lm, head, rec, reference, tok)
            continue
        window = crop_window(len(residues), max_residues, crop, rec.id)
        if window is None:
            log.warning("record %s: %d residues > %d, skipped (crop=skip)", rec.id, len(residues), max_residues)
            continue
        a, b = window
        if dense_max is None or b - a <= dense_max:
            p = dense_probabilities(head, layer_tiles(lm, residues[a:b]))
            yield ContactPrediction(rec.id, rec.sequence[a:b], p, a)
        else:
            lts = iter_layer_tiles(lm, residues[a:b])
            pairs = top_probabilities(head, lts, max(1, int((b - a) * top)), head.min_sep)
            yield ContactPrediction(rec.id, rec.sequence[a:b], None, a, pairs=pairs)


def _predict_aligned(lm, head: ContactHead, rec: SequenceRecord, reference: str, tok: Tokenizer) -> ContactPrediction:
    """One input through the reference's frame: align, predict on the aligned row, map back."""
    seq = rec.sequence.upper()
    src, dst = aligned_positions(seq, reference)
    row = np.full(len(reference), tok.encode("X")[0], dtype=np.int64)
    row[dst] = tok.encode(seq)[src]
    p_ref = dense_probabilities(head, layer_tiles(lm, row))
    return _mapped_back(rec, p_ref, src, dst)


def _residues(rec: SequenceRecord, tok: Tokenizer) -> np.ndarray:
    """The record's token ids; an empty sequence or a letter that is not an amino acid is a :class:`UserError`."""
    try:
        residues = tok.encode(rec.sequence)
    except UnknownResidueError as e:
        raise UserError(f"record {rec.id}: {e}; give amino-acid letters only") from e
    if len(residues) == 0:
        raise UserError(f"record {rec.id}: empty sequence")
    return residues


def _mapped_back(rec: SequenceRecord, p_ref: np.ndarray, src: np.ndarray, dst: np.ndarray) -> ContactPrediction:
    """The reference's map ``p_ref`` read at the input's aligned residues (``src`` on ``dst``); 0 elsewhere."""
    p = np.zeros((len(rec.sequence), len(rec.sequence)), dtype=np.float32)
    p[np.ix_(src, src)] = p_ref[np.ix_(dst, dst)]
    return ContactPrediction(rec.id, rec.sequence, p, 0, src.astype(np.int32))


def _predict_potts(
    loaded: potts.LoadedPotts, head: ContactHead, sequences, check: bool, align_to: str | bool | None
) -> Iterator[ContactPrediction]:
    """An attention-Potts model's map (the same for every input, over its query) through ``head``,
    each input aligned onto the query and its pairs read off the query's map."""
    if check:
        head.check_model(loaded.sha256, 1, 1, where=loaded.checkpoint)
    reference = reference_sequence(head, align_to)
    if reference != loaded.query:
        raise UserError(
            f"{loaded.checkpoint}: an attention-Potts model's map is over its query ({loaded.query_id}); "
            "inputs are aligned onto it (leave align_to out)"
        )
    p_ref, tok = potts.probabilities(head, loaded), Tokenizer()
    for rec in as_records(sequences):
        _residues(rec, tok)
        yield _mapped_back(rec, p_ref, *aligned_positions(rec.sequence.upper(), reference))


def _load(checkpoint: str, model_config: str | None, device: str, head: ContactHead):
    """The model ``head`` reads (a :class:`LoadedModel`, or a :class:`.potts.LoadedPotts` for an
    attention-Potts head), checked against the head."""
    if potts.is_potts_head(head):
        loaded = potts.load_potts(checkpoint)
        head.check_model(loaded.sha256, 1, 1, where=str(checkpoint))
        return loaded
    loaded = load_model(checkpoint, model_config, 0, device)
    cfg = loaded.model.config
    head.check_model(loaded.sha256, cfg.depth, cfg.heads, where=str(checkpoint))
    return loaded


# ------------------------------------------------------------------------------ files
class ContactsFile:
    """Read a contacts.h5 written by :func:`run_predict_contacts` (refuses an incomplete one)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: contacts file not found")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise UserError(f"{self.path}: not a readable HDF5 contacts file ({e}); rerun predict_contacts") from e
        if not self._h5.attrs.get(COMPLETE_ATTR, False):
            self._h5.close()
            raise IncompleteOutputError(
                f"{self.path}: incomplete: predict_contacts was interrupted; rerun with resume=true"
            )

    def ids(self) -> list[str]:
        groups = sorted(self._h5.values(), key=lambda g: int(g.attrs["index"]))
        return [str(g.attrs["id"]) for g in groups]

    def __iter__(self) -> Iterator[ContactPrediction]:
        for g in sorted(self._h5.values(), key=lambda g: int(g.attrs["index"])):
            yield ContactPrediction(
                str(g.attrs["id"]),
                str(g.attrs["sequence"]),
                g["contacts"][()].astype(np.float32) if "contacts" in g else None,
                int(g.attrs.get("start", 0)),
                g["aligned"][()] if "aligned" in g else None,
                None if "contacts" in g else (*g["top_pairs"][()].T, g["top_probabilities"][()]),
            )

    def __len__(self) -> int:
        return len(self._h5)

    @property
    def attrs(self) -> dict:
        """The file's own attributes (checkpoint_sha256, head, align_to, run_settings, ...)."""
        return dict(self._h5.attrs)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> ContactsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _group_name(h5: h5py.File, rid: str, index: int) -> str:
    name = sanitize_name(rid)
    return name if name not in h5 else f"{name}~{index}"


def _records_done(h5: h5py.File) -> set[int]:
    """Input indices already predicted; a record killed mid-write has no 'done' mark: dropped, redone."""
    done: set[int] = set()
    for name in list(h5):
        if not h5[name].attrs.get(DONE_ATTR, False):
            del h5[name]
        else:
            done.add(int(h5[name].attrs["index"]))
    return done


def _write_prediction(h5: h5py.File, rec: SequenceRecord, index: int, pred: ContactPrediction) -> None:
    group = h5.create_group(_group_name(h5, rec.id, index))
    group.attrs["id"] = rec.id
    group.attrs["sequence"] = pred.sequence
    group.attrs["index"] = index
    group.attrs["start"] = pred.start
    if pred.contacts is not None:
        group.create_dataset(
            "contacts", data=pred.contacts.astype(np.float16), compression="gzip", compression_opts=1, shuffle=True
        )
    else:
        i, j, p = pred.pairs
        group.create_dataset("top_pairs", data=np.stack([i, j], -1).astype(np.int32), compression="gzip")
        group.create_dataset("top_probabilities", data=np.asarray(p, dtype=np.float32))
    if pred.aligned is not None:
        group.create_dataset("aligned", data=np.asarray(pred.aligned, dtype=np.int32))
    # the map reaches the file before the mark that says it is there: HDF5 writes what one flush
    # holds in no particular order, so a kill inside it must not leave 'done' on a half-written map
    ResumableH5.commit(h5, group, DONE_ATTR, True)


@dataclass
class PredictSummary:
    """What :func:`run_predict_contacts` wrote."""

    output: str
    records: int  # contact maps in the file
    input_failures: list[dict]  # records left out, with the reason
    checkpoint_sha256: str
    head: str  # the contact_head.json used
    align_to: str  # the reference the maps are aligned to ("" for none)
    already_complete: bool = False  # resume=true over a finished output: nothing was done


def run_predict_contacts(
    checkpoint: str,
    head: str,
    input: str,
    output: str,
    csv_path: str | None = None,
    png_dir: str | None = None,
    top: float = 1.0,
    crop: str = "error",
    min_residues: int = 30,
    invalid: str = "error",
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    model_config: str | None = None,
    align_to: str | bool | None = None,
    dense_max: int | None = DENSE_MAX,
) -> PredictSummary:
    """What ``python -m protein_performer.predict_contacts`` does. Returns its :class:`PredictSummary`.
    ``align_to``, ``dense_max``: see :func:`predict_contacts` (default: the head's reference, if it
    names one; sequences above ``dense_max`` residues get their top pairs, ``top`` x L of them)."""
    from tqdm.auto import tqdm

    device = resolve_device(device)
    run = check_run_paths(input, output, "predict_contacts", resume, overwrite)
    out = run.output
    contact_head = ContactHead.load(head)
    head_path = Path(head) / "contact_head.json" if Path(head).is_dir() else Path(head)
    head_sha = file_sha256(head_path)
    reference = reference_sequence(contact_head, align_to) or ""
    options = {
        "command": "predict_contacts",
        "head_sha256": head_sha,
        "align_to": reference,
        "crop": crop,
        "min_residues": min_residues,
        "invalid": invalid,
        **({} if dense_max == DENSE_MAX else {"dense_max": dense_max, "top": top}),
    }

    def run_settings(sha: str | None = None) -> dict:
        return rerun.run_settings(checkpoint, model_config, 0, input, sha, **options)

    if rerun.finished_output(
        out, run.partial, run_settings, resume, overwrite, lambda h5: bool(h5.attrs.get(COMPLETE_ATTR))
    ):
        return _finished_summary(out, csv_path, png_dir, top, contact_head.min_sep)
    loaded = _load(checkpoint, model_config, device, contact_head)
    settings = {"checkpoint_sha256": loaded.sha256, "head_sha256": head_sha, "input": str(input), "align_to": reference}
    resumed = run.resumes(settings, lambda h5: {k: h5.attrs.get(k) for k in settings})
    report = InputReport()
    records = list(read_sequences(input, min_residues=min_residues, invalid=invalid, report=report))
    with run.open(resumed) as h5:
        done: set[int] = set()
        if not resumed:
            h5.attrs.update(
                {
                    "format_version": FORMAT_VERSION,
                    "checkpoint": str(checkpoint),
                    "checkpoint_sha256": loaded.sha256,
                    "head": str(head_path),
                    "head_sha256": head_sha,
                    "input": str(input),
                    "align_to": reference,
                }
            )
        else:
            done = _records_done(h5)
            if done:
                log.info("resuming: %d of %d records already predicted", len(done), len(records))
        bar = tqdm(total=len(records), initial=len(done), disable=not progress, unit="seq", desc="contacts")
        predict_kw = dict(crop=crop, check_checkpoint=False, align_to=reference or False, dense_max=dense_max, top=top)
        # one at a time, in input order, so that a resumed file holds the same groups
        for n, rec in ((n, r) for n, r in enumerate(records) if n not in done):
            preds = list(predict_contacts(loaded, contact_head, [rec], **predict_kw))
            for pred in preds:
                _write_prediction(h5, rec, n, pred)
            if not preds:
                report.failures.append({"source": rec.source, "reason": f"{rec.id}: too long, skipped (crop=skip)"})
            bar.update(1)
        bar.close()
        run.complete(h5.attrs, run_settings(loaded.sha256), COMPLETE_ATTR)
    run.publish()
    with ContactsFile(out) as cf:
        n_written = len(cf)
        if csv_path or png_dir:
            _write_extras(cf, csv_path, png_dir, top, contact_head.min_sep)
    log.info("%d contact maps -> %s", n_written, out)
    return PredictSummary(str(out), n_written, report.failures, loaded.sha256, str(head_path), reference)


def _finished_summary(out: Path, csv_path: str | None, png_dir: str | None, top: float, min_sep: int) -> PredictSummary:
    """:func:`run_predict_contacts`'s summary of a finished file (``resume=true`` over it); a
    ``csv=`` / PNG that is missing (killed before it was written) is written from the file."""
    with ContactsFile(out) as cf:
        n = len(cf)
        attrs = {k: str(cf.attrs.get(k, "")) for k in ("checkpoint_sha256", "head", "align_to")}
        _write_extras(cf, csv_path, png_dir, top, min_sep, missing_only=True)
    log.info("%s is already complete (%d records); nothing to do", out, n)
    return PredictSummary(str(out), n, [], **attrs, already_complete=True)


def _write_extras(
    cf: ContactsFile, csv_path: str | None, png_dir: str | None, top: float, min_sep: int, missing_only: bool = False
) -> None:
    """``csv=`` and the PNGs from a finished file (``missing_only``: those not there yet)."""
    if csv_path and missing_only and Path(csv_path).exists():
        csv_path = None
    if csv_path:
        with atomic_output(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "i", "j", "probability"])
            for pred in cf:
                k = max(1, int(len(pred.sequence) * top))
                for i, j, p in pred.top_pairs(k, min_sep):
                    w.writerow([pred.id, i, j, f"{p:.4f}"])
    if png_dir:
        ids = {rid for rid in cf.ids() if not (missing_only and (Path(png_dir) / f"{sanitize_name(rid)}.png").exists())}
        for pred in cf if ids else ():
            if pred.id in ids:
                plot_prediction(pred, Path(png_dir) / f"{sanitize_name(pred.id)}.png", min_sep)


__all__ = [
    "ContactPrediction",
    "ContactsFile",
    "contact_features",
    "predict_contacts",
    "reference_sequence",
    "run_predict_contacts",
]
