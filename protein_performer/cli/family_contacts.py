"""``python -m protein_performer.family_contacts family=PFxxxxx output_dir=<OUT> [input=<pfam40 FASTA>]
[structures=<dir>] [option=value ...] [<hydra override> ...]``: the family-contacts recipe
(:mod:`protein_performer.recipes.family_contacts`: extract, ingest, train, export, score, contacts)
for one Pfam family; prints the headline scores and where the summary and the contact head are.

``python -m protein_performer.family_contacts input=<a3m | sto | aligned FASTA | FASTA of homologs>
[query=<record id | sequence | FASTA | pdb/cif>] output_dir=<OUT> [structure=<pdb/cif>] [minutes=3]
[method=attention_potts | lm]``: the user's own family (:mod:`protein_performer.recipes.family_contacts.tool`):
an attention-Potts model (:mod:`protein_performer.model.attention_potts`, the default) or the
recipe's factored LM (``method=lm``, ``minutes`` default 10) fitted on it; the query's contact map in
``<OUT>/contacts.h5`` / ``.csv`` / ``.png`` and the head for ``predict_contacts``. This mode is chosen when ``query=`` is given, the input is an
A3M / Stockholm file, or no ``family=`` is given.

The recipe's own options are ``key=value``; every other ``key=value`` whose key is dotted (``model.dim=64``),
starts with ``+`` or ``~``, or is one of :data:`TRAIN_KEYS` (``data=<group>``, ``model=<group>``, ...)
goes to training as a Hydra override. The family's FASTA is ``input=``: ``data=`` is the Hydra data
group, and ``data=<file>`` (the option's old name) is an error naming ``input=``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from protein_performer.errors import UserError, cli_errors
from protein_performer.recipes.family_contacts import tool
from protein_performer.recipes.family_contacts.run import KORTEMME40, PFAM40, STAGES, RecipeSummary, run
from protein_performer.resources import CONF

# top-level train keys passed through as Hydra overrides (groups and plain values of conf/train.yaml)
TRAIN_KEYS = ("seed", "num_threads", "model", "data", "objective")


def data_groups() -> list[str]:
    """The names ``data=<group>`` takes (``conf/data/*.yaml``)."""
    return sorted(p.stem for p in (Path(CONF) / "data").glob("*.yaml"))


def defaults() -> dict[str, str]:
    """The recipe's options and their defaults, as the command line spells them."""
    return {
        "family": "",
        "output_dir": "",
        "input": "" if PFAM40 is None else str(PFAM40),
        "structures": "" if KORTEMME40 is None else str(KORTEMME40),
        "max_identity": "0.9",
        "max_sequences": "",
        "stages": "",
        "probe_every_s": "",
        "homologs": "0",
        "experiment": "",
        "align": "false",
        "resume": "false",
        "overwrite": "false",
        "query": "",
        "structure": "",
        "minutes": "",
        "method": "attention_potts",
    }


def is_tool(opts: dict[str, str]) -> bool:
    """Whether the options ask for the user's-own-family mode (see the module docstring)."""
    own_input = opts["input"] != defaults()["input"]
    return bool(opts["query"]) or tool.is_alignment_file(opts["input"]) or (own_input and not opts["family"])


def parse(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` arguments -> (the recipe's options, the Hydra overrides for training)."""
    opts, overrides = defaults(), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if "=" in arg and key in opts:
            opts[key] = value
        elif "=" in arg and key == "data" and value not in data_groups():
            raise UserError(
                f"family_contacts: data= is the Hydra data group ({', '.join(data_groups())}); the family's "
                f"FASTA is input=<pfam40_domains.fasta.gz>: give input={value}"
            )
        elif "=" in arg and ("." in key or key.startswith(("+", "~")) or key in TRAIN_KEYS):
            overrides.append(arg)
        else:
            raise UserError(
                f"family_contacts: expected key=value with a key in {', '.join(opts)} or a Hydra "
                f"override (group.key=value), got {arg!r}"
            )
    if is_tool(opts) and opts["family"]:
        raise UserError(
            "family_contacts: family= trains on a shared Pfam family; input=<alignment or homologs> with query= "
            "on your own family: give one or the other"
        )
    if not opts["output_dir"] or not (opts["family"] or is_tool(opts)):
        raise UserError(
            "family_contacts: give family=PFxxxxx and output_dir=<dir>, or input=<a3m | sto | FASTA> "
            "[query=...] and output_dir=<dir>"
        )
    return opts, overrides


def flag(value: str, key: str) -> bool:
    """``true`` / ``false`` (also 1 / 0, yes / no) of option ``key``."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"family_contacts: {key} must be true or false, got {value!r}")


def report(s: RecipeSummary, output_dir: str) -> None:
    """The headline lines of a run: the scores, the fitted head and where the summary is."""
    h = s.headline
    if h:
        print(
            f"{s.family}: mean-of-heads APC map, long-range P@L {h['long_P@L']:.3f} (P@L/5 "
            f"{h['long_P@L/5']:.3f}); random init {h['random_long_P@L']:.3f}; contact density "
            f"{h['long_density']:.3f}; valid acc {s.train.get('valid/acc')}"
        )
    ha = s.homolog_averaged
    if ha:
        print(
            f"homolog-averaged map ({ha['n_homologs']} family members aligned onto the chain): long-range P@L "
            f"{ha['trained']['long']['P@L']:.3f}; random init {ha['random_init']['long']['P@L']:.3f}"
        )
    head = s.fitted_head
    fitted = head.get("leave_family_out")
    if fitted:
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
        print(f"head for predict_contacts ({kind}): {Path(output_dir) / head['head']}")
    print(f"summary: {Path(output_dir) / 'summary.json'}")


def run_own(opts: dict[str, str], overrides: list[str], stages: list[str]) -> RecipeSummary:
    """The user's-own-family mode (:func:`protein_performer.recipes.family_contacts.tool.run_tool`)."""
    try:
        minutes = float(opts["minutes"] or tool.DEFAULT_MINUTES[opts["method"]])
    except ValueError:
        raise UserError(f"family_contacts: minutes must be a number, got {opts['minutes']!r}") from None
    return tool.run_tool(
        opts["input"],
        opts["output_dir"],
        overrides,
        query=opts["query"] or None,
        structure=opts["structure"] or None,
        minutes=minutes,
        experiment=opts["experiment"] or tool.EXPERIMENT,
        stages=stages,
        resume=flag(opts["resume"], "resume"),
        overwrite=flag(opts["overwrite"], "overwrite"),
        method=opts["method"],
    )


def report_tool(s: RecipeSummary, output_dir: str) -> None:
    """The headline lines of a run on the user's own family: the query's map, the head, the scores."""
    out = Path(output_dir)
    prep = s.record.get("prepare") or {}
    if prep:
        print(
            f"{s.family}: {prep['n_kept']} of {prep['n_sequences']} sequences (N_eff {prep['n_eff']}), "
            f"{prep['n_columns_kept']} columns; query {prep['query_id']} ({prep['query_length']} residues)"
        )
    if s.record.get("contacts"):
        print(f"contact map: {out / 'contacts.h5'} (top-L pairs: {out / 'contacts.csv'}, plot: {out / 'contacts.png'})")
        if (out / "contact_head.json").is_file():
            print(
                f"head for predict_contacts: {out / 'contact_head.json'} (checkpoint {out / 'checkpoints' / 'last.ckpt'})"
            )
        else:
            print(f"attention-Potts model: {out / 'checkpoints' / 'last.ckpt'}")
    h = s.headline
    if h:
        print(
            f"against {Path(s.record['scores']['structure']).name}: long-range P@L {h['long_P@L']:.3f} "
            f"(P@L/5 {h['long_P@L/5']:.3f}); random init {h['random_long_P@L']:.3f}"
        )
    print(f"summary: {out / 'summary.json'}")


@cli_errors
def main(argv: Sequence[str] | None = None) -> None:
    """The command: parse ``argv`` (default ``sys.argv[1:]``), run the recipe, print the headline."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts, overrides = parse(argv)
    known = tool.stages_of(opts["method"]) if is_tool(opts) else STAGES
    stages = [s for s in opts["stages"].split(",") if s] or list(known)
    if set(stages) - set(known):
        raise UserError(f"family_contacts: unknown stages {sorted(set(stages) - set(known))}; choose from {known}")
    if is_tool(opts):
        report_tool(run_own(opts, overrides, stages), opts["output_dir"])
        return
    s = run(
        opts["family"],
        opts["output_dir"],
        overrides,
        input=opts["input"] or None,
        structures=opts["structures"] or None,
        max_identity=float(opts["max_identity"]),
        max_sequences=int(opts["max_sequences"]) if opts["max_sequences"] else None,
        stages=stages,
        probe_every_s=float(opts["probe_every_s"]) if opts["probe_every_s"] else None,
        homologs=int(opts["homologs"]),
        experiment=opts["experiment"] or "family_contacts",
        align=flag(opts["align"], "align"),
        resume=flag(opts["resume"], "resume"),
        overwrite=flag(opts["overwrite"], "overwrite"),
    )
    report(s, opts["output_dir"])
