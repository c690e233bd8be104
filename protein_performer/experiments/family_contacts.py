"""A family-level model whose attention maps carry contacts (issue 12, item 3).

    python -m protein_performer.experiments.family_contacts family=PF00072 output_dir=<OUT>
        [data=<pfam40_domains.fasta.gz>] [structures=<kortemme40 dir>] [max_identity=0.9]
        [max_sequences=N] [stages=extract,ingest,train,export,score,contacts]
        [resume=true | overwrite=true] [<hydra override> ...]

1. extract: the family's domains from the pfam40 FASTA (header ``>NAME/start-end PFxxxxx``) into
   ``<OUT>/family.fasta``, leaving out every domain at least ``max_identity`` identical to the
   family's kortemme40 chain (the test protein; see :func:`holdout_similar`);
2. ingest into ``<OUT>/shards`` (train/valid/test by sequence hash);
3. train ``experiment=family_contacts`` (Hydra overrides after the options), run folder
   ``<OUT>``: the checkpoint is ``<OUT>/checkpoints/last.ckpt``;
4. export the maps of the family's chain for the trained model and a random-init twin;
5. score the unsupervised mean-of-heads APC map (no fitted weights) and each layer's mean, by
   range (short 6-11, medium 12-23, long >= 24) and P@L, P@L/2, P@L/5; write
   ``<OUT>/summary.json`` and ``<OUT>/contacts.png`` (predicted vs true contacts);
6. contacts: the maps of every chain of ``structures`` (trained and random init) in
   ``<OUT>/kortemme40/``, the ``contacts`` step on them with 20 training chains (report, and the
   contact head for ``predict_contacts`` in ``<OUT>/kortemme40/contacts/contact_head.json``), and the
   head fitted leave-family-out: on chains of other families only, scored on the family's chain
   (see :mod:`protein_performer.experiments.family_head`).

With ``probe_every_s`` the :class:`ContactProbe` callback also scores the chain during training
(the same map from the in-memory model), which gives precision against training minutes.

``<OUT>/summary.json`` records the stages done (rewritten after each one). A rerun over stages
already done is refused; ``resume=true`` says a complete output is complete (exit 0, nothing
changed) or runs the stages not done; ``overwrite=true`` reruns into a staging folder beside
``<OUT>`` that replaces it only when complete (see :mod:`protein_performer.experiments.family_rerun`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from protein_performer.errors import UserError, cli_errors
from protein_performer.experiments import family_rerun
from protein_performer.experiments.family_data import (  # noqa: F401  (re-exported: see __all__)
    aligned_positions,
    extract_family,
    family_chain,
    holdout_similar,
    identity,
    read_family,
    read_family_fasta,
)
from protein_performer.experiments.family_scoring import (  # noqa: F401
    ContactProbe,
    chain_residues,
    homolog_averaged_map,
    mean_apc_maps,
    plot_contacts,
    score_homolog_averaged,
    score_map,
    score_maps,
)
from protein_performer.experiments.span_masking import FamilyDataModule, SpanCollator, mask_spans  # noqa: F401
from protein_performer.resources import CONF as PACKAGE_CONF
from protein_performer.resources import shared_data

__all__ = [
    "CONF",
    "KORTEMME40",
    "PFAM40",
    "STAGES",
    "ContactProbe",
    "FamilyDataModule",
    "RunPaths",
    "SpanCollator",
    "aligned_positions",
    "chain_residues",
    "compose",
    "extract_family",
    "family_chain",
    "holdout_similar",
    "homolog_averaged_map",
    "identity",
    "main",
    "mask_spans",
    "mean_apc_maps",
    "plot_contacts",
    "read_family",
    "read_family_fasta",
    "run",
    "score_homolog_averaged",
    "score_map",
    "score_maps",
]

log = logging.getLogger(__name__)

CONF = PACKAGE_CONF  # ships in the package (a checkout's conf/)
# pfam40 / kortemme40 are too large to ship: defaults in resources.shared_data() ($PP_SHARED_DATA, or
# ../shared/data beside a checkout; none otherwise); else give data= and structures= (a missing one
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
@dataclass
class RunPaths:
    """The files of one recipe run under ``out``."""

    out: Path
    structure: Path

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


def _ingest_stage(paths: RunPaths) -> dict:
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


def _train_stage(
    paths: RunPaths, overrides: Sequence[str], probe_every_s: float | None, summary: dict, experiment: str
) -> None:
    """Train ``experiment`` into ``paths.out`` (with the probe callback when asked)."""
    from protein_performer.training.train import train

    extra = [f"data.root={paths.shards}", f"run_dir={paths.out}"]
    if probe_every_s:
        paths.probe.unlink(missing_ok=True)
        extra += [
            f"+callbacks.probe._target_={__name__}.ContactProbe",
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
    plot_contacts(
        paths.maps,
        paths.structure,
        paths.out / "contacts.png",
        f"{family} ({paths.structure.stem}): mean APC map\nlong P@L {trained['long']['P@L']:.2f} "
        f"(random init {random_init['long']['P@L']:.2f})",
    )


def _contacts_stage(paths: RunPaths, structures: str | Path, align: bool) -> dict:
    """Maps of every chain of ``structures``, the ``contacts`` report and saved head, and the head
    fitted leave-family-out (see :mod:`protein_performer.experiments.family_head`). A model trained
    on aligned rows (``align``) gets a head that names the chain as its reference (``align_to``)."""
    from protein_performer.experiments.family_head import contacts_stage

    align_to = {"id": paths.structure.stem, "sequence": chain_residues(paths.structure)[0]} if align else None
    return contacts_stage(paths.checkpoint, structures, paths.structure, paths.out, align_to)


def run(
    family: str,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    data: str | Path | None = PFAM40,
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
) -> dict:
    """The whole recipe for one family; returns (and writes) ``<output_dir>/summary.json``. Over an
    output with finished stages it refuses, unless ``resume`` (complete: nothing to do; else the
    stages not done) or ``overwrite`` (a rerun in a staging folder that replaces the output only
    when complete): see :mod:`protein_performer.experiments.family_rerun`."""
    for value, option in ((structures, "structures=<kortemme40 dir>"), (data, "data=<pfam40_domains.fasta.gz>")):
        if value is None:  # no default: an installed package without $PP_SHARED_DATA
            raise UserError(f"family_contacts: give {option} (or set PP_SHARED_DATA to the folder holding it)")
    out = Path(output_dir).resolve()
    settings = family_rerun.settings(
        overrides,
        experiment,
        align,
        family=family,
        data=data,
        structures=structures,
        max_identity=max_identity,
        max_sequences=max_sequences,
        homologs=homologs,
        probe_every_s=probe_every_s,
    )
    todo = family_rerun.plan(out, stages, STAGES, settings, resume, overwrite)
    if todo is None:
        return family_rerun.read_summary(out)
    with family_rerun.output_folder(out, overwrite, family_rerun.needs_copy(stages, STAGES)) as folder:
        paths = RunPaths(folder, family_chain(structures, family))
        summary = family_rerun.read_summary(folder)
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
        return _run_stages(paths, todo, summary, overrides, settings)


def _run_stages(paths: RunPaths, todo: Sequence[str], summary: dict, overrides: Sequence[str], settings: dict) -> dict:
    """The stages ``todo`` of the run of ``settings`` (:func:`family_rerun.settings`) in
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
                    settings["data"],
                    family,
                    paths.fasta,
                    chain_residues(paths.structure)[0],
                    settings["max_identity"],
                    settings["max_sequences"],
                    align=align,
                ),
            ),
        ),
        ("ingest", lambda: summary.__setitem__("shards", _ingest_stage(paths))),
        ("train", lambda: _train_stage(paths, overrides, probe_every_s, summary, experiment)),
        ("export", lambda: _export_stage(paths)),
        ("score", lambda: _score_stage(paths, family, summary)),
        ("contacts", lambda: summary.__setitem__("fitted_head", _contacts_stage(paths, structures, align))),
    ]
    for name, work in steps:
        if name in todo:
            timed(name, work)
            family_rerun.ran(summary, name, STAGES)
            family_rerun.write_summary(paths.out, summary)
    if homologs and "score" in todo:
        timed(
            "homologs",
            lambda: summary.__setitem__(
                "homolog_averaged", score_homolog_averaged(paths.checkpoint, paths.structure, paths.fasta, homologs)
            ),
        )
    if paths.probe.exists():
        summary["probe"] = [json.loads(x) for x in paths.probe.read_text().splitlines() if x]
    family_rerun.write_summary(paths.out, summary)
    return summary


def _parse(argv: Sequence[str]) -> tuple[dict, list[str]]:
    opts = {
        "family": None,
        "output_dir": None,
        "data": "" if PFAM40 is None else str(PFAM40),
        "structures": "" if KORTEMME40 is None else str(KORTEMME40),
        "max_identity": "0.9",
        "max_sequences": "",
        "stages": ",".join(STAGES),
        "probe_every_s": "",
        "homologs": "0",
        "experiment": "family_contacts",
        "align": "false",
        "resume": "false",
        "overwrite": "false",
    }
    overrides = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and key in opts:
            opts[key] = arg.split("=", 1)[1]
        elif "=" in arg and (
            "." in key or key.startswith(("+", "~")) or key in ("seed", "num_threads", "model", "data", "objective")
        ):
            overrides.append(arg)
        else:
            raise UserError(
                f"family_contacts: expected key=value with a key in {', '.join(opts)} or a Hydra "
                f"override (group.key=value), got {arg!r}"
            )
    if not opts["family"] or not opts["output_dir"]:
        raise UserError("family_contacts: give family=PFxxxxx and output_dir=<dir>")
    return opts, overrides


def _flag(value: str, key: str = "align") -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"family_contacts: {key} must be true or false, got {value!r}")


@cli_errors
def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts, overrides = _parse(sys.argv[1:] if argv is None else argv)
    stages = [s for s in opts["stages"].split(",") if s]
    if set(stages) - set(STAGES):
        raise UserError(f"family_contacts: unknown stages {sorted(set(stages) - set(STAGES))}; choose from {STAGES}")
    s = run(
        opts["family"],
        opts["output_dir"],
        overrides,
        opts["data"] or None,
        opts["structures"] or None,
        float(opts["max_identity"]),
        int(opts["max_sequences"]) if opts["max_sequences"] else None,
        stages,
        float(opts["probe_every_s"]) if opts["probe_every_s"] else None,
        int(opts["homologs"]),
        opts["experiment"],
        _flag(opts["align"]),
        _flag(opts["resume"], "resume"),
        _flag(opts["overwrite"], "overwrite"),
    )
    h = s.get("headline")
    if h:
        print(
            f"{s['family']}: mean-of-heads APC map, long-range P@L {h['long_P@L']:.3f} (P@L/5 "
            f"{h['long_P@L/5']:.3f}); random init {h['random_long_P@L']:.3f}; contact density "
            f"{h['long_density']:.3f}; valid acc {s.get('train', {}).get('valid/acc')}"
        )
    ha = s.get("homolog_averaged")
    if ha:
        print(
            f"homolog-averaged map ({ha['n_homologs']} family members aligned onto the chain): long-range P@L "
            f"{ha['trained']['long']['P@L']:.3f}; random init {ha['random_init']['long']['P@L']:.3f}"
        )
    fitted = (s.get("fitted_head") or {}).get("leave_family_out")
    if fitted:
        head = s["fitted_head"]
        print(
            f"L1 logistic head fitted leave-family-out ({fitted['train_size']} chains of other families, "
            f"{fitted['draws']} draws): long-range P@L {fitted['trained']['mean']['long']['P@L']:.3f}; "
            f"random init {fitted['random_init']['mean']['long']['P@L']:.3f}"
        )
        kind = (
            f"the calibrated mean of all maps, inputs aligned onto {head['align_to']}"
            if head.get("kind") == "mean"
            else "the L1 logistic regression"
        )
        print(f"head for predict_contacts ({kind}): {Path(opts['output_dir']) / head['head']}")
    print(f"summary: {Path(opts['output_dir']) / 'summary.json'}")


if __name__ == "__main__":
    main()
