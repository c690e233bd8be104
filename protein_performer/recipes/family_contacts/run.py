"""The family-contacts pipeline (the stages of :mod:`protein_performer.recipes.family_contacts`):
:func:`run` for one family, each stage a small function, ``<OUT>/summary.json`` rewritten after each.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from protein_performer.errors import UserError
from protein_performer.recipes.family_contacts import rerun
from protein_performer.recipes.family_contacts.extract import extract_family, family_chain
from protein_performer.recipes.family_contacts.scoring import (
    chain_residues,
    plot_contacts,
    score_homolog_averaged,
    score_maps,
)
from protein_performer.resources import CONF, shared_data

log = logging.getLogger(__name__)

# pfam40 / kortemme40 are too large to ship: defaults in resources.shared_data() ($PP_SHARED_DATA, or
# ../shared/data beside a checkout; none otherwise); else give input= and structures= (a missing one
# is an error naming it)
SHARED = shared_data()
PFAM40 = None if SHARED is None else SHARED / "pfam40_domains.fasta.gz"
KORTEMME40 = None if SHARED is None else SHARED / "structures" / "kortemme40"
STAGES = ("extract", "ingest", "train", "export", "score", "contacts")


# ------------------------------------------------------------------------------ training
def compose(overrides: Sequence[str] = (), experiment: str = "family_contacts"):
    """``train`` config with ``experiment=<experiment>`` and ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[f"experiment={experiment}", *overrides])


# ------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class RecipeSummary:
    """What a run returns: the fields its callers read, and ``record``, ``<OUT>/summary.json`` as
    written (the fields are entries of it; ``{}`` for a stage that did not run)."""

    family: str
    headline: dict
    train: dict
    homolog_averaged: dict
    fitted_head: dict
    record: dict

    @classmethod
    def from_record(cls, record: dict) -> RecipeSummary:
        """The summary of a ``summary.json`` record."""
        fields = ("headline", "train", "homolog_averaged", "fitted_head")
        return cls(family=record.get("family", ""), record=record, **{k: record.get(k) or {} for k in fields})


@dataclass
class RunPaths:
    """The files of one recipe run under ``out`` (``structure``: the chain it is scored on, if any)."""

    out: Path
    structure: Path | None

    @property
    def fasta(self) -> Path:
        return self.out / "family.fasta"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoints" / "last.ckpt"

    @property
    def maps(self) -> Path:
        return self.out / "maps.h5"

    @property
    def maps_random(self) -> Path:
        return self.out / "maps_random.h5"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    @property
    def probe(self) -> Path:
        return self.out / "probe.jsonl"


def ingest_stage(paths: RunPaths) -> dict:
    """The family's FASTA into shards; returns the sequences per split."""
    from protein_performer.data.ingest import ingest

    # no OOD families: the family's accession is in every header and would send it all to ood
    manifest = ingest(
        input=str(paths.fasta),
        output_dir=str(paths.shards),
        overwrite=True,
        progress=False,
        workers=1,
        ood_families=[],
        fractions={"train": 0.94, "valid": 0.05, "test": 0.01},
    )
    return {k: v.get("n_sequences") for k, v in manifest.get("splits", {}).items()}


def train_stage(
    paths: RunPaths, overrides: Sequence[str], probe_every_s: float | None, summary: dict, experiment: str
) -> None:
    """Train ``experiment`` into ``paths.out`` (with the probe callback when asked)."""
    from protein_performer.training.train import train

    extra = [f"data.root={paths.shards}", f"run_dir={paths.out}"]
    if probe_every_s:
        paths.probe.unlink(missing_ok=True)
        extra += [
            "+callbacks.probe._target_=protein_performer.recipes.family_contacts.scoring.ContactProbe",
            f"+callbacks.probe.structure={paths.structure}",
            f"+callbacks.probe.output={paths.probe}",
            f"+callbacks.probe.every_s={probe_every_s}",
        ]
    cfg = compose([*extra, *overrides], experiment)
    metrics = train(cfg)
    summary["train"] = {
        k: metrics.get(k)
        for k in ("global_step", "valid/acc", "valid/ppl", "valid/unigram_acc", "valid/loss")
        if k in metrics
    }
    summary["num_threads"] = cfg.get("num_threads")


def _export_stage(paths: RunPaths) -> None:
    """Maps of the family's chain for the checkpoint and its random-init twin."""
    from protein_performer.analysis.export import run_export

    run_export(str(paths.checkpoint), str(paths.structure), str(paths.maps), overwrite=True, progress=False)
    run_export(
        "random",
        str(paths.structure),
        str(paths.maps_random),
        model_config=str(paths.checkpoint),
        overwrite=True,
        progress=False,
    )


def _score_stage(paths: RunPaths, family: str, summary: dict) -> None:
    """Unsupervised scores, the headline and the contacts plot."""
    scores = score_maps(paths.maps, paths.structure, paths.maps_random)
    summary["scores"] = scores
    trained, random_init = scores["trained"]["mean"], scores["random_init"]["mean"]
    summary["headline"] = {
        "long_P@L": trained["long"]["P@L"],
        "long_P@L/5": trained["long"]["P@L/5"],
        "random_long_P@L": random_init["long"]["P@L"],
        "long_density": trained["long_density"],
    }
    couplings = _coupling_scores(paths)
    if couplings is not None:  # one layer of factored attention: its reading as Potts couplings too
        scores["couplings"] = couplings
        summary["headline"]["couplings_long_P@L"] = couplings["long"]["P@L"]
    plot_contacts(
        paths.maps,
        paths.structure,
        paths.out / "contacts.png",
        f"{family} ({paths.structure.stem}): mean APC map\nlong P@L {trained['long']['P@L']:.2f} "
        f"(random init {random_init['long']['P@L']:.2f})",
    )


def _coupling_scores(paths: RunPaths) -> dict | None:
    """The checkpoint's coupling map scored on the chain (:mod:`.couplings`), None for models it
    does not read (more than one layer, or content queries and keys)."""
    from protein_performer.pretrained import load_model
    from protein_performer.recipes.family_contacts.couplings import reads_as_couplings, score_couplings

    model = load_model(str(paths.checkpoint)).model
    return score_couplings(model, paths.maps, paths.structure) if reads_as_couplings(model) else None


def _contacts_stage(paths: RunPaths, structures: str | Path, align: bool) -> dict:
    """Maps of every chain of ``structures``, the ``contacts`` report and saved head, and the head
    fitted leave-family-out (see :mod:`protein_performer.recipes.family_contacts.head`). A model trained
    on aligned rows (``align``) gets a head that names the chain as its reference (``align_to``)."""
    from protein_performer.recipes.family_contacts.head import contacts_stage

    align_to = {"id": paths.structure.stem, "sequence": chain_residues(paths.structure)[0]} if align else None
    return contacts_stage(paths.checkpoint, structures, paths.structure, paths.out, align_to)


def run(
    family: str,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    input: str | Path | None = PFAM40,
    structures: str | Path | None = KORTEMME40,
    max_identity: float = 0.9,
    max_sequences: int | None = None,
    stages: Sequence[str] = STAGES,
    probe_every_s: float | None = None,
    homologs: int = 0,
    experiment: str = "family_contacts",
    align: bool = False,
    resume: bool = False,
    overwrite: bool = False,
) -> RecipeSummary:
    """The whole recipe for one family; writes ``<output_dir>/summary.json`` and returns it. Over an
    output with finished stages it refuses, unless ``resume`` (complete: nothing to do; else the
    stages not done) or ``overwrite`` (a rerun in a staging folder that replaces the output only
    when complete): see :mod:`protein_performer.recipes.family_contacts.rerun`."""
    for value, option in ((structures, "structures=<kortemme40 dir>"), (input, "input=<pfam40_domains.fasta.gz>")):
        if value is None:  # no default: an installed package without $PP_SHARED_DATA
            raise UserError(f"family_contacts: give {option} (or set PP_SHARED_DATA to the folder holding it)")
    out = Path(output_dir).resolve()
    settings = rerun.settings(
        overrides,
        experiment,
        align,
        family=family,
        input=input,
        structures=structures,
        max_identity=max_identity,
        max_sequences=max_sequences,
        homologs=homologs,
        probe_every_s=probe_every_s,
    )
    todo = rerun.plan(out, stages, STAGES, settings, resume, overwrite)
    if todo is None:
        return RecipeSummary.from_record(rerun.read_summary(out))
    with rerun.output_folder(out, overwrite, rerun.needs_copy(stages, STAGES)) as folder:
        paths = RunPaths(folder, family_chain(structures, family))
        summary = rerun.read_summary(folder)
        summary.update(
            {
                "family": family,
                "structure": str(paths.structure),
                "experiment": experiment,
                "align": align,
                "overrides": list(overrides),
                "settings": settings,
            }
        )
        return RecipeSummary.from_record(_run_stages(paths, todo, summary, overrides, settings))


def _run_stages(paths: RunPaths, todo: Sequence[str], summary: dict, overrides: Sequence[str], settings: dict) -> dict:
    """The stages ``todo`` of the run of ``settings`` (:func:`rerun.settings`) in
    ``paths.out``; ``summary.json`` is rewritten after each one."""
    family, structures, homologs = settings["family"], settings["structures"], settings["homologs"]
    experiment, align, probe_every_s = settings["experiment"], settings["align"], settings["probe_every_s"]
    times = summary.setdefault("seconds", {})

    def timed(name: str, work: Callable[[], None]) -> None:
        start = time.time()
        log.info("family_contacts %s: %s", family, name)
        work()
        times[name] = round(time.time() - start, 1)

    steps: list[tuple[str, Callable[[], None]]] = [
        (
            "extract",
            lambda: summary.__setitem__(
                "extract",
                extract_family(
                    settings["input"],
                    family,
                    paths.fasta,
                    chain_residues(paths.structure)[0],
                    settings["max_identity"],
                    settings["max_sequences"],
                    align=align,
                ),
            ),
        ),
        ("ingest", lambda: summary.__setitem__("shards", ingest_stage(paths))),
        ("train", lambda: train_stage(paths, overrides, probe_every_s, summary, experiment)),
        ("export", lambda: _export_stage(paths)),
        ("score", lambda: _score_stage(paths, family, summary)),
        ("contacts", lambda: summary.__setitem__("fitted_head", _contacts_stage(paths, structures, align))),
    ]
    for name, work in steps:
        if name in todo:
            timed(name, work)
            rerun.ran(summary, name, STAGES)
            rerun.write_summary(paths.out, summary)
    if homologs and "score" in todo:
        timed(
            "homologs",
            lambda: summary.__setitem__(
                "homolog_averaged", score_homolog_averaged(paths.checkpoint, paths.structure, paths.fasta, homologs)
            ),
        )
    if paths.probe.exists():
        summary["probe"] = [json.loads(x) for x in paths.probe.read_text().splitlines() if x]
    rerun.write_summary(paths.out, summary)
    return summary
