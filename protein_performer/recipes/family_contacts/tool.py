"""The family-contacts recipe on a user's own family (issue 21, item 1): an alignment or homologs and a
query in, the query's contact map out.

    python -m protein_performer.family_contacts input=<a3m | sto | aligned fasta | fasta of homologs>
        [query=<sequence | fasta | pdb/cif>] output_dir=<OUT> [structure=<pdb/cif>] [minutes=3]
        [method=attention_potts | lm]

The input's kind: ``.a3m`` and ``.sto`` / ``.stk`` / ``.stockholm`` (``.gz`` allowed) are alignments
(:mod:`.msa`); a FASTA file whose records all have one length and hold gaps is an aligned FASTA;
any other FASTA holds unaligned homologs, each aligned onto the query (global BLOSUM62, as the
recipe's ``align=true``). The query: by default the alignment's first record; ``query=`` gives a
record id, a sequence, a FASTA file (its first record) or a structure (its first protein chain's
sequence); with an alignment it must be one of its records (by id or by its residues).

Stages (``<OUT>/summary.json`` records them; ``resume=true`` / ``overwrite=true`` as the recipe's,
see :mod:`.rerun`):

1. prepare: :func:`.msa.filter_gaps` (query gaps, rows and columns over half gaps), the DCA weights
   of :func:`.msa.sequence_weights` (1 / neighbours at >= 80% identity) on the filtered alignment;
   ``<OUT>/family.fasta`` holds each kept row over the query's positions (``X`` at its gaps and at
   the dropped columns: the model's position i is the query's residue i), ``<OUT>/weights.tsv`` its
   weight. The input is read and checked before anything is written: a bad alignment (ragged rows,
   no query, nothing left after filtering) is one :class:`.msa.AlignmentError` naming the file.

With ``method=attention_potts`` (the default) the stages are prepare, train, contacts: train fits
:class:`~protein_performer.model.attention_potts.AttentionPotts` on the kept rows for ``minutes`` (the
weights in its pseudo-likelihood, :data:`.tool_potts.KEYS` its settings) and saves it as the checkpoint;
contacts writes its head (:func:`protein_performer.analysis.contacts.potts.query_head`) and the
query's map through ``predict_contacts``, the files and scores as below. With ``method=lm``:

2. ingest into ``<OUT>/shards``;
3. train ``experiment=family_contacts_aligned`` for ``minutes`` (``trainer.max_time``) with a
   progress bar of the time left (:class:`TimeLeftBar`). The weights drive the training *sampler*
   (:class:`.data.WeightedBatchSampler`: sequences drawn with probability proportional to their
   weight), not the loss; checkpoint ``<OUT>/checkpoints/last.ckpt``;
4. contacts: the contact head ``<OUT>/contact_head.json`` (:func:`query_head`: the z-score of the
   query's mean-of-heads APC map, a ranking rather than a calibrated probability: no structure is
   fitted), the query's map through ``predict_contacts`` (so that ``python -m
   protein_performer.predict_contacts checkpoint=<OUT>/checkpoints/last.ckpt head=<OUT>/contact_head.json``
   gives the same map), written as ``<OUT>/contacts.h5`` (``contacts`` (L, L) float32 over the
   query's positions, ``top_pairs`` (L, 2) 1-based, ``top_probability``), ``<OUT>/contacts.csv`` (the
   top-L pairs, 1-based, ``|i - j| >= 6``) and ``<OUT>/contacts.png``; with ``structure=`` the map is
   scored against it (and the random-init twin's), by range, as the recipe's ``score`` stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein_performer.analysis.alignment import GAP_RESIDUE, aligned_row
from protein_performer.data.tokenizer import RESIDUES, Tokenizer, UnknownResidueError
from protein_performer.errors import UserError
from protein_performer.model import attention_potts
from protein_performer.outputs import atomic_output
from protein_performer.recipes.family_contacts import msa, rerun, tool_potts
from protein_performer.recipes.family_contacts.query_map import (
    MIN_SEP,
    Z_INTERCEPT,
    headline,
    structure_scores,
    write_contacts,
)
from protein_performer.recipes.family_contacts.run import RecipeSummary, RunPaths, ingest_stage, train_stage

log = logging.getLogger(__name__)

STAGES = ("prepare", "ingest", "train", "contacts")
POTTS_STAGES = ("prepare", "train", "contacts")  # method=attention_potts: no shards, the rows are fitted in memory
METHODS = ("attention_potts", "lm")
DEFAULT_MINUTES = {"attention_potts": 3.0, "lm": 10.0}  # the budgets measured in benchmarks/RESULTS.md
EXPERIMENT = "family_contacts_aligned"


def stages_of(method: str) -> tuple[str, ...]:
    """The stages of a tool run with ``method``."""
    if method not in METHODS:
        raise UserError(f"family_contacts: method must be one of {', '.join(METHODS)}, got {method!r}")
    return POTTS_STAGES if method == "attention_potts" else STAGES


STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")


def is_alignment_file(path: str | Path) -> bool:
    """Whether ``path`` is named as an A3M or Stockholm file (``.gz`` allowed)."""
    name = Path(path).name.lower().removesuffix(".gz")
    return Path(name).suffix in msa.SUFFIXES


# ------------------------------------------------------------------------------ input
@dataclass(frozen=True)
class Prepared:
    """The checked input: the query, the training rows over its positions and their weights."""

    query_id: str
    query: str
    ids: list[str]
    rows: list[str]
    weights: np.ndarray
    stats: dict
    states: np.ndarray | None = None  # (rows, kept columns) Potts states 0-20 (attention_potts.potts_states)
    positions: np.ndarray | None = None  # the query position (0-based) of each kept column


def read_query(query: str) -> tuple[str, str]:
    """``(id, sequence)`` of ``query=``: a FASTA file's first record, a structure's first protein
    chain, or the sequence itself (id ``query``)."""
    from protein_performer.analysis.export import read_sequences

    path = Path(query)
    if path.is_file():
        records = list(read_sequences(path, min_residues=1))
        if not records:
            raise UserError(f"query={query}: no sequence in the file")
        return records[0].id, records[0].sequence.upper()
    try:
        Tokenizer().encode(query.upper())
    except UnknownResidueError as e:
        raise UserError(f"query={query[:40]}: not a file, nor a sequence ({e})") from None
    return "query", query.upper()


def _alignment_query(input: Path, query: str | None) -> msa.Alignment:
    """The alignment with its query row: the first record, a record id, or the record whose residues
    are the query's sequence."""
    if query is None:
        return msa.read_alignment(input)
    aln = msa.read_alignment(input)
    if query in aln.ids:
        return msa.read_alignment(input, query=query)
    _, sequence = read_query(query)
    tok = Tokenizer()
    for n, row in enumerate(aln.tokens):
        if tok.decode(row[row != msa.GAP]) == sequence:
            return msa.read_alignment(input, query=aln.ids[n])
    raise msa.AlignmentError(
        f"{input}: no record is the query ({sequence[:20]}..., {len(sequence)} residues); give query=<record id> "
        "or leave query= out to use the first record"
    )


def _homologs(input: Path, query: str | None) -> msa.Alignment:
    """Unaligned homologs, each aligned onto the query (the first record unless ``query``)."""
    records = msa.fasta_sequences(input)
    if not records:
        raise msa.AlignmentError(f"{input}: no record, so no query; give homologs in FASTA")
    qid, sequence = read_query(query) if query else records[0]
    if sequence not in [s for _, s in records]:
        records = [(qid, sequence), *records]
    log.info("%s: aligning %d sequences onto the query %r (%d residues)", input, len(records), qid, len(sequence))
    tok = Tokenizer()
    for rid, seq in records:
        try:
            valid = tok.encode(seq).size > 0
        except UnknownResidueError:
            valid = False
        if not valid:
            raise msa.AlignmentError(
                f"{input}: record {rid!r}: empty or not amino-acid letters (allowed: {RESIDUES}, either case)"
            )
    gap, unknown = msa.TABLE[ord("-")], msa.TABLE[ord(GAP_RESIDUE)]
    tokens = np.empty((len(records), len(sequence)), dtype=np.uint8)
    for n, (_, seq) in enumerate(records):
        codes = msa.TABLE[np.frombuffer(aligned_row(seq, sequence).encode("ascii"), dtype=np.uint8)]
        tokens[n] = np.where(codes == unknown, gap, codes)  # X: no residue on that query position
    q = next(n for n, (_, s) in enumerate(records) if s == sequence)
    ids = [rid for rid, _ in records]
    return msa.Alignment(ids=ids, tokens=tokens, query=q, columns=np.arange(len(sequence)), path=str(input))


def prepare(
    input: str | Path,
    query: str | None = None,
    max_row_gap: float = msa.MAX_ROW_GAP,
    max_col_gap: float = msa.MAX_COL_GAP,
) -> Prepared:
    """Read, check, filter and weight the input (nothing is written; see the module docstring)."""
    input = Path(input)
    if not input.is_file():
        raise msa.AlignmentError(f"{input}: input file not found")
    aligned = is_alignment_file(input) or msa.fasta_is_aligned(input)
    aln = _alignment_query(input, query) if aligned else _homologs(input, query)
    query_sequence = aln.query_sequence
    # the query's residues on the alignment's columns, in order: column -> position in query_sequence
    on_query = np.sort(aln.columns[aln.columns >= 0])
    kept = msa.filter_gaps(aln, max_row_gap, max_col_gap)
    positions = np.searchsorted(on_query, kept.columns)
    weights = msa.sequence_weights(kept.tokens)
    # token id -> letter (ids below n_special never occur in an alignment); msa.GAP (29) -> X
    letters = np.frombuffer(("?" * Tokenizer().n_special + RESIDUES + GAP_RESIDUE).encode("ascii"), dtype="S1")
    rows = []
    for tokens in kept.tokens:
        row = np.full(len(query_sequence), GAP_RESIDUE.encode("ascii"), dtype="S1")
        row[positions] = letters[tokens]
        rows.append(row.tobytes().decode("ascii"))
    stats = {
        "format": "alignment" if aligned else "unaligned homologs",
        "n_sequences": len(aln.ids),
        "n_columns": int(aln.tokens.shape[1]),
        "n_kept": len(kept.ids),
        "n_columns_kept": int(len(kept.columns)),
        "n_eff": round(float(weights.sum()), 2),
        "query_length": len(query_sequence),
    }
    states = attention_potts.potts_states(kept.tokens)
    return Prepared(kept.ids[kept.query], query_sequence, kept.ids, rows, weights, stats, states, positions)


def write_prepared(prepared: Prepared, paths: RunPaths) -> dict:
    """``family.fasta`` (ids ``s<n>``, the input's id after them) and ``weights.tsv``."""
    with atomic_output(paths.fasta) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for n, (rid, row) in enumerate(zip(prepared.ids, prepared.rows)):
            fh.write(f">s{n} {rid}\n{row}\n")
    with atomic_output(weights_path(paths)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write("id\tweight\n")
        fh.writelines(f"s{n}\t{w:.6g}\n" for n, w in enumerate(prepared.weights))
    return {**prepared.stats, "query_id": prepared.query_id, "query": prepared.query}


def weights_path(paths: RunPaths) -> Path:
    """The weights TSV of a run."""
    return paths.out / "weights.tsv"


# ------------------------------------------------------------------------------ training
def max_time(minutes: float) -> str:
    """``trainer.max_time`` (``DD:HH:MM:SS``) of ``minutes``."""
    seconds = round(minutes * 60)
    if seconds <= 0:
        raise UserError(f"family_contacts: minutes must be > 0, got {minutes}")
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def training_overrides(paths: RunPaths, prepared: Prepared, minutes: float, n_train: int, user: Sequence[str]) -> list:
    """The tool's Hydra overrides (before the user's, which win; a key the user sets is left to them):
    the weights, room for the query (+ <bos>, <eos>), the time budget and its progress bar, and a
    batch no larger than the training split."""
    given = {o.lstrip("+~").partition("=")[0] for o in user}
    out = [
        f"data.weights={weights_path(paths)}",
        f"data.max_length={max(160, len(prepared.query) + 2)}",
        "+callbacks.time_left._target_=protein_performer.recipes.family_contacts.tool.TimeLeftBar",
        f"+callbacks.time_left.seconds={minutes * 60}",
        f"trainer.max_time={max_time(minutes)}",
    ]
    if n_train < 128:  # the experiment's batch of 128 would not fill once
        out.append(f"data.batch_size={max(1, n_train)}")
    return [o for o in out if o.lstrip("+").partition("=")[0] not in given]


try:
    import pytorch_lightning as pl

    class TimeLeftBar(pl.Callback):
        """A tqdm bar over the training budget (``seconds``), with the steps done and the time left."""

        def __init__(self, seconds: float):
            self.seconds = float(seconds)
            self._bar = None
            self._t0 = 0.0

        def on_train_start(self, trainer, pl_module):
            from tqdm.auto import tqdm

            self._t0 = time.time()
            fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{remaining} left{postfix}]"
            self._bar = tqdm(
                total=round(self.seconds), desc="training", bar_format=fmt, disable=not trainer.is_global_zero
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed = min(time.time() - self._t0, self.seconds)
            self._bar.update(elapsed - self._bar.n)
            self._bar.set_postfix(step=trainer.global_step, refresh=False)

        def on_train_end(self, trainer, pl_module):
            if self._bar is not None:
                self._bar.close()
except ImportError:  # pragma: no cover - lightning is a dependency
    pass


# ------------------------------------------------------------------------------ the query's map
def query_head(loaded, query_id: str, query: str):
    """The contact head of the query's map: ``logit = (m_ij - mu) / sigma - 3`` with ``m`` the mean
    over layers and heads of the APC maps (the recipe's unsupervised score) and ``mu``, ``sigma``
    its mean and standard deviation over the query's pairs ``|i - j| >= 6``; it names the query as
    its reference (``align_to``), so ``predict_contacts`` reads any input in the query's frame."""
    from protein_performer.analysis.contacts.head import ContactHead
    from protein_performer.analysis.contacts.predict import contact_features

    feats = contact_features(loaded, Tokenizer().encode(query)).astype(np.float64)
    n_layers, n_heads = feats.shape[:2]
    i, j = np.triu_indices(len(query), k=MIN_SEP)
    mean_map = feats.mean((0, 1))[i, j]
    mu, sigma = float(mean_map.mean()), float(mean_map.std()) if mean_map.size else 0.0
    n = n_layers * n_heads
    return ContactHead(
        n_layers,
        n_heads,
        weights=np.full(n, 1.0 / n),
        intercept=Z_INTERCEPT,
        mean=np.full(n, mu),
        scale=np.full(n, sigma if sigma > 0 else 1.0),
        min_sep=MIN_SEP,
        checkpoint=loaded.checkpoint,
        checkpoint_sha256=loaded.sha256,
        training_proteins=[query_id],
        settings={"kind": "query z-score of the mean of all maps", "intercept": Z_INTERCEPT},
        align_to={"id": query_id, "sequence": query},
    )


def score_structure(checkpoint: Path, contacts: np.ndarray, query: str, structure: str | Path) -> dict:
    """The query's map (and the random-init twin's mean APC map) against ``structure``'s first
    chain, aligned onto the query: precision by range and P@L (:func:`.scoring.score_map`)."""
    from protein_performer.analysis.contacts.predict import contact_features
    from protein_performer.pretrained import load_model

    random_init = load_model("random", model_config=str(checkpoint))
    random_map = contact_features(random_init, Tokenizer().encode(query)).astype(np.float64).mean((0, 1))
    return structure_scores(contacts, random_map, query, structure)


def contacts_stage(paths: RunPaths, prepared: Prepared, structure: str | None, summary: dict) -> None:
    """The head, the query's map and its files, and the scores against ``structure``."""
    from protein_performer.analysis.contacts.predict import predict_contacts
    from protein_performer.pretrained import load_model

    loaded = load_model(str(paths.checkpoint))
    head = query_head(loaded, prepared.query_id, prepared.query)
    head_path = head.save(paths.out / "contact_head.json")
    (pred,) = predict_contacts(loaded, head, [(prepared.query_id, prepared.query)])
    top = write_contacts(paths.out, pred, head_path)
    summary["contacts"] = {"head": head_path.name, "L": len(prepared.query), "top_pair": list(top[0]) if top else []}
    if structure:
        headline(summary, score_structure(paths.checkpoint, pred.contacts, prepared.query, structure))


# ------------------------------------------------------------------------------ pipeline
def run_tool(
    input: str | Path,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    query: str | None = None,
    structure: str | Path | None = None,
    minutes: float = 10.0,
    experiment: str = EXPERIMENT,
    stages: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    method: str = "attention_potts",
) -> RecipeSummary:
    """The tool for one input (see the module docstring); writes ``<output_dir>/summary.json`` and
    returns it. The input is read and checked first: a bad one leaves ``output_dir`` untouched."""
    all_stages = stages_of(method)
    stages = all_stages if stages is None else tuple(stages)
    if method == "attention_potts":
        tool_potts.settings(overrides)  # bad settings fail before anything is written
    prepared = prepare(input, query)
    if structure is not None and not Path(structure).is_file():
        raise UserError(f"structure={structure}: file not found")
    max_time(minutes)  # a bad budget fails before anything is written
    out = Path(output_dir).resolve()
    settings = rerun.settings(
        overrides,
        experiment,
        True,
        input=str(Path(input).resolve()),
        query=query or "",
        structure=str(Path(structure).resolve()) if structure else "",
        minutes=minutes,
        **({"method": method} if method != "lm" else {}),
    )
    todo = rerun.plan(out, stages, all_stages, settings, resume, overwrite)
    if todo is None:
        return RecipeSummary.from_record(rerun.read_summary(out))
    with rerun.output_folder(out, overwrite, rerun.needs_copy(stages, all_stages)) as folder:
        paths = RunPaths(folder, None)
        summary = rerun.read_summary(folder)
        summary.update(
            {"family": Path(input).name, "query_id": prepared.query_id, "experiment": experiment, "settings": settings}
        )
        summary["overrides"] = list(overrides)
        times = summary.setdefault("seconds", {})

        def train() -> None:
            n_train = int((summary.get("shards") or {}).get("train") or 0)
            extra = training_overrides(paths, prepared, minutes, n_train, overrides)
            train_stage(paths, [*extra, *overrides], None, summary, experiment)

        steps = {
            "prepare": lambda: summary.__setitem__("prepare", write_prepared(prepared, paths)),
            "ingest": lambda: summary.__setitem__("shards", ingest_stage(paths)),
            "train": train,
            "contacts": lambda: contacts_stage(paths, prepared, settings["structure"], summary),
        }
        if method == "attention_potts":
            steps["train"] = lambda: tool_potts.train_stage(paths, prepared, minutes, overrides, summary)
            steps["contacts"] = lambda: tool_potts.contacts_stage(paths, prepared, settings["structure"], summary)
        for name in all_stages:
            if name in todo:
                start = time.time()
                log.info("family_contacts %s: %s", paths.out, name)
                steps[name]()
                times[name] = round(time.time() - start, 1)
                rerun.ran(summary, name, all_stages)
                rerun.write_summary(paths.out, summary)
        return RecipeSummary.from_record(summary)
