"""Contact study, the run behind ``python -m protein_performer.contacts``: read the structures,
pair them with the maps, evaluate every predictor, fit and save the contact head, write the
report and plots into ``output_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protein_performer.analysis.contacts.head import (
    ESM_TRAIN_PROTEINS,
    ContactHead,
    head_from_estimator,
    training_subset,
)
from protein_performer.analysis.contacts.metrics import MIN_SEP, RANGES
from protein_performer.analysis.contacts.proteins import TRAINED, Protein, load_proteins
from protein_performer.analysis.contacts.report import (
    plot_contact_map,
    plot_precision_by_range,
    write_report_csv,
    write_report_json,
)
from protein_performer.analysis.contacts.study import evaluate, fit_logistic, fit_mean_calibration
from protein_performer.analysis.maps.reader import MapsFile
from protein_performer.analysis.rerun import check_output_dir, finished_report, input_stamp, jsonable, staged_output
from protein_performer.analysis.structures import (
    STRUCTURE_SUFFIXES,
    Chain,
    LoadFailure,
    MissingStructuresError,
    StructureError,
    load_structures,
    structure_files,
)
from protein_performer.errors import UserError

log = logging.getLogger(__name__)

HEAD_FILE = "contact_head.json"
REPORT_FILE = "report.json"
# what a contacts run writes into output_dir (anything else there is kept by a rerun)
OUTPUTS = frozenset({REPORT_FILE, "report.csv", "precision_by_range.png", "contact_maps", HEAD_FILE})
HEAD_KINDS = ("logistic", "mean")  # ESM's L1 regression over every map | the calibrated mean of all maps


def run_contacts(
    maps: str | Path,
    structures: str | Path,
    output_dir: str | Path,
    baseline_maps: str | Path | None = None,
    chains: Sequence[str] | None = None,
    min_residues: int = 30,
    threshold: float = 8.0,
    min_identity: float = 0.9,
    max_mismatches: int = 3,
    n_folds: int = 5,
    train_size: int | None = None,
    C: float = 0.15,
    solver: str = "liblinear",
    seed: int = 0,
    n_plots: int = 4,
    standardize: bool = True,
    save_head: bool = True,
    head_train_size: int | None = ESM_TRAIN_PROTEINS,
    head_kind: str = "logistic",
    head_align_to: dict | None = None,
    resume: bool = False,
) -> dict:
    """Everything the ``contacts`` entry point does: load, evaluate, write the report and plots.
    With ``save_head`` it also fits the contact head once, on ``head_train_size`` proteins drawn by
    ``seed`` (ESM's protocol: 20; all when None or fewer), and saves it as
    ``<output_dir>/contact_head.json`` for ``predict_contacts``. ``head_kind``: ``logistic`` (ESM's
    L1 regression, the report's ``trained``) or ``mean`` (the mean of all maps, the report's
    ``trained_mean``, with its probabilities calibrated on the training proteins: for a factored
    family model, whose maps together are its couplings). ``head_align_to``: the reference chain
    the saved head names (``ContactHead.align_to``). Returns the report (without the prediction
    matrices).

    A rerun replaces ``output_dir``'s outputs only when all of them are written (see
    :mod:`~protein_performer.analysis.rerun`); ``resume``: a finished report of the same inputs and
    settings is returned as it is, without work."""
    if head_kind not in HEAD_KINDS:
        raise UserError(f"head_kind={head_kind!r}: choose one of {', '.join(HEAD_KINDS)}")
    out = Path(output_dir)
    check_output_dir(out)
    options = {
        k: v
        for k, v in locals().items()
        if k not in ("maps", "structures", "baseline_maps", "output_dir", "resume", "out")
    }
    inputs = {
        "maps": input_stamp(maps),
        "baseline_maps": input_stamp(baseline_maps),
        "structures": input_stamp(structures),
        "options": jsonable(options),
    }
    if resume and (done := finished_report(out / REPORT_FILE, inputs, "contacts")) is not None:
        return done
    all_chains, failures = _read_structures(structures, min_residues)
    proteins, more = load_proteins(maps, all_chains, baseline_maps, chains, threshold, min_identity, max_mismatches)
    failures = failures + more
    if len(proteins) < 2:
        why = f"; first failure: {failures[0].reason}" if failures else ""
        raise UserError(
            f"{maps}: only {len(proteins)} of its records match a chain of {structures} (contact "
            f"evaluation needs at least 2){why}; export the maps from these structures "
            "(export_attention input=<structure folder>)"
        )
    report = evaluate(proteins, n_folds, train_size, C, solver, seed, standardize)
    preds = report.pop("predictions")
    report = {
        "maps": str(maps),
        "baseline_maps": str(baseline_maps) if baseline_maps else None,
        "structures": str(structures),
        "n_proteins": len(proteins),
        "settings": {
            "threshold": threshold,
            "min_sep": MIN_SEP,
            "ranges": RANGES,
            "C": C,
            "solver": solver,
            "n_folds": n_folds,
            "train_size": train_size,
            "seed": seed,
            "min_identity": min_identity,
            "max_mismatches": max_mismatches,
        },
        **report,
        "failures": [f.as_dict() for f in failures],
        "inputs": inputs,
    }
    head = (
        fit_contact_head(proteins, maps, C, solver, seed, standardize, head_train_size, head_kind, head_align_to)
        if save_head
        else None
    )
    if head is not None:
        report["contact_head"] = {
            "file": HEAD_FILE,
            "kind": head_kind,
            "training_proteins": head.training_proteins,
            "nonzero_weights": int(np.count_nonzero(head.weights)),
            "checkpoint_sha256": head.checkpoint_sha256,
        }
    with staged_output(out, OUTPUTS) as stage:
        _write_outputs(stage, report, proteins, preds, head, n_plots)
    return report


def _write_outputs(
    out: Path,
    report: dict,
    proteins: Sequence[Protein],
    preds: dict[str, dict[str, np.ndarray]],
    head: ContactHead | None,
    n_plots: int,
) -> None:
    """CSV, plots and the head, then ``report.json`` last, into the staging folder ``out``."""
    write_report_csv(report, out)
    plot_precision_by_range(report, out / "precision_by_range.png")
    for p in proteins[:n_plots]:
        plot_contact_map(
            p, {m: preds[m][p.name] for m in preds if p.name in preds[m]}, out / "contact_maps" / f"{p.name}.png"
        )
    if head is not None:
        head.save(out / HEAD_FILE)
    write_report_json(report, out)


def fit_contact_head(
    proteins: Sequence[Protein],
    maps: str | Path,
    C: float = 0.15,
    solver: str = "liblinear",
    seed: int = 0,
    standardize: bool = True,
    train_size: int | None = ESM_TRAIN_PROTEINS,
    kind: str = "logistic",
    align_to: dict | None = None,
) -> ContactHead:
    """The contact head of the model whose ``maps`` these are, fitted on ``train_size`` proteins
    drawn by ``seed``, with the checkpoint's sha256: the L1 logistic regression of
    :func:`fit_logistic` (``kind="logistic"``), or the mean of all maps with the calibration of
    :func:`fit_mean_calibration` (``kind="mean"``: equal weights ``a / F``, intercept ``b``)."""
    idx = training_subset([p.name for p in proteins], train_size, seed)
    train = [proteins[i] for i in idx]
    with MapsFile(maps) as mf:
        sha = mf.attrs["checkpoint_sha256"]
        checkpoint = mf.export_info.get("checkpoint", "")
    n_layers, n_heads = proteins[0].n_heads[TRAINED]
    meta = dict(
        min_sep=MIN_SEP,
        checkpoint=str(checkpoint),
        checkpoint_sha256=sha,
        training_proteins=[p.name for p in train],
        align_to=dict(align_to or {}),
    )
    settings = {"kind": kind, "seed": seed, "train_size": train_size, "maps": str(maps)}
    if kind == "mean":
        a, b = fit_mean_calibration(train, TRAINED, seed)
        n = n_layers * n_heads
        return ContactHead(n_layers, n_heads, np.full(n, a / n), b, np.zeros(n), np.ones(n), settings=settings, **meta)
    model = fit_logistic(train, TRAINED, C, solver, seed, standardize)
    return head_from_estimator(
        model,
        n_layers,
        n_heads,
        settings={"C": C, "solver": solver, "standardize": standardize, **settings},
        **meta,
    )


def _read_structures(structures: str | Path, min_residues: int) -> tuple[list[Chain], list[LoadFailure]]:
    """The chains of ``structures`` (a folder or one file); a clear error when none can be read."""
    path = Path(structures)
    if not path.exists():
        raise MissingStructuresError(f"structures not found: {path}")
    if path.is_dir() and not structure_files(path):
        raise StructureError(
            f"{path}: no structure files ({', '.join(STRUCTURE_SUFFIXES)}) in this folder; "
            "give the folder of PDB / mmCIF files the maps were exported from"
        )
    chains, failures = load_structures(path, min_residues=min_residues)
    if not chains:
        why = failures[0].reason if failures else f"no protein chain with >= {min_residues} standard residues"
        raise StructureError(
            f"{path}: no usable structure chain ({why}); give PDB / mmCIF files "
            "(structures= is a folder of them, or one file)"
        )
    return chains, failures
