"""Issue 12's check: ``predict_contacts`` on the kortemme40 chains' sequences, with a recipe
checkpoint and the head ``contacts`` saved for it, gives probabilities whose long-range P@L matches
what ``contacts`` reports for the same model within 0.01.

    python benchmarks/predict_contacts_check.py --run /tmp/family_contacts_runs/PF00072_aligned_exact_10min

The run folder is one of the family-contacts recipe (``<run>/checkpoints/last.ckpt``) whose
``contacts`` stage exported the maps of the kortemme40 chains into ``<run>/kortemme40/``
(``benchmarks/family_contacts.py --head``). Steps, each a real command:

1. ``python -m protein_performer.contacts`` on those maps with ``train_size=20`` (one split: the
   report's precision is over the chains *not* among the 20 training chains, and the head it saves is
   fitted on the same 20: ``head_train_size=20``, same seed), with the recipe head's kind
   (``head_kind=mean`` for the aligned recipe: compared with the report's ``trained_mean``; ``logistic``:
   with ``trained``);
2. ``python -m protein_performer.predict_contacts`` with the checkpoint and that head on a FASTA of the
   chains' sequences (``chains.tsv``; chains too long for the model are skipped, as in the export);
3. long-range P@L of each predicted map against the structure, averaged over the report's test chains,
   next to the report's number. Result: benchmarks/results/predict_contacts_check.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import Floor, day, newest, record, source, write  # noqa: E402

from protein_performer.resources import shared_data  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "predict_contacts_check.json"
SHARED = shared_data()  # $PP_SHARED_DATA, or ../shared/data beside the checkout
TOLERANCE = 0.01
HEADING = ""  # a line of the family-contacts part, after it


def section(rec: dict) -> str:
    """RESULTS.md's line for a ``predict_contacts_check`` record: the recipe's own head on the family's chain."""
    own = rec.get("recipe_head_on_family_chain")
    if not own:
        return ""
    aligned = ", inputs aligned onto the chain" if own["head_kind"] == "mean" else ""
    return (
        f"- `predict_contacts` with the recipe's checkpoint and head ({own['head_kind']} kind{aligned}) on "
        f"{own['chain']}: long P@L {own['predict_contacts_long_P@L']:.3f}, the recipe's unsupervised score "
        f"{own['recipe_unsupervised_long_P@L']:.3f} ({source(rec)}, {day(rec['date'])})."
    )


def floors(records: list[dict]) -> list[Floor]:
    """Issue 12: predict_contacts from the sequences gives the long-range P@L the contacts report gives."""
    rec = newest(records)
    what = "abs(predict_contacts - contacts report) long P@L, same checkpoint and head"
    if rec is None:
        return [Floor("12", what, TOLERANCE, True, None, None, "python benchmarks/predict_contacts_check.py")]
    return [Floor("12", f"{what} ({Path(rec['run']).name})", TOLERANCE, True, abs(rec["difference"]), rec)]


def _run(args: list[str]) -> str:
    command = "python " + " ".join(shlex.quote(a) for a in args)
    print(command, flush=True)
    subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
    )
    return command


def write_fasta(structures: Path, path: Path) -> dict[str, str]:
    """The chains' sequences (chains.tsv) as FASTA, ids = the maps' record ids (``<stem>_<chain>``)."""
    with open(structures / "chains.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    seqs = {f"{Path(r['file']).stem}_{r['chain']}": r["atom_sequence"] for r in rows}
    path.write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    return seqs


def score_predictions(predicted: Path, structures: Path) -> dict[str, float]:
    """Long-range P@L of every predicted map against its chain's structure."""
    from protein_performer.analysis.contacts import contact_map, precision_at_k
    from protein_performer.analysis.contacts.predict import ContactsFile
    from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence, load_structures

    chains = {c.name: c for c in load_structures(structures)[0]}
    out = {}
    with ContactsFile(predicted) as cf:
        for pred in cf:
            chain = chains[pred.id]
            true = contact_map(coords_on_sequence(chain, align_to_sequence(chain, pred.sequence)))
            out[pred.id] = precision_at_k(pred.contacts, true, 24, None, 1.0)
    return out


def recipe_head_on_chain(run: Path, structures: Path, seqs: dict[str, str], kind: str, commands: list[str]) -> dict:
    """The user's view: the recipe's own head (and, for an aligned model, its reference) on the family's
    chain, next to the unsupervised score the recipe reported for it; the command is added to ``commands``."""
    root, ckpt = run / "kortemme40", run / "checkpoints" / "last.ckpt"
    summary = json.loads((run / "summary.json").read_text())
    chain = Path(summary["structure"]).stem
    name = next(n for n in seqs if n.startswith(chain))
    one = root / "family_chain.fasta"
    one.write_text(f">{name}\n{seqs[name]}\n")
    predicted = root / "predicted_family_chain.h5"
    commands.append(
        _run(
            [
                "-m",
                "protein_performer.predict_contacts",
                f"checkpoint={ckpt}",
                f"head={root / 'contacts' / 'contact_head.json'}",
                f"input={one}",
                f"output={predicted}",
                "overwrite=true",
                "progress=false",
            ]
        )
    )
    got = score_predictions(predicted, structures)[name]
    print(
        f"recipe head on {name}: long P@L {got:.4f} (the recipe's unsupervised map: {summary['headline']['long_P@L']:.4f})"
    )
    return {
        "chain": name,
        "head_kind": kind,
        "predict_contacts_long_P@L": got,
        "recipe_unsupervised_long_P@L": summary["headline"]["long_P@L"],
    }


def head_kind(path: Path) -> str:
    """The kind of the recipe's saved head (``logistic`` when there is none)."""
    return json.loads(path.read_text()).get("settings", {}).get("kind", "logistic") if path.is_file() else "logistic"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("/tmp/family_contacts_runs/PF00072_aligned_exact_10min"))
    p.add_argument("--structures", type=Path, default=SHARED / "structures" / "kortemme40")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the check on ``--run`` and write results/predict_contacts_check.json."""
    a = parse_args(argv)
    root = a.run / "kortemme40"
    if not (root / "maps.h5").is_file():
        raise SystemExit(
            f"{root / 'maps.h5'} not found: run the recipe's contacts stage first "
            "(benchmarks/family_contacts.py --head, or the recipe with stages=contacts)"
        )
    contacts_dir, predicted, fasta = root / "contacts_check", root / "predicted.h5", root / "chains.fasta"
    ckpt = a.run / "checkpoints" / "last.ckpt"
    recipe_head = root / "contacts" / "contact_head.json"
    kind = head_kind(recipe_head)
    method = "trained_mean" if kind == "mean" else "trained"
    commands = [
        _run(
            [
                "-m",
                "protein_performer.contacts",
                f"maps={root / 'maps.h5'}",
                f"structures={a.structures}",
                f"output_dir={contacts_dir}",
                "train_size=20",
                "head_train_size=20",
                "seed=0",
                "n_plots=0",
                f"head_kind={kind}",
            ]
        )
    ]
    seqs = write_fasta(a.structures, fasta)
    commands.append(
        _run(
            [
                "-m",
                "protein_performer.predict_contacts",
                f"checkpoint={ckpt}",
                f"head={contacts_dir / 'contact_head.json'}",
                f"input={fasta}",
                f"output={predicted}",
                "crop=skip",
                "overwrite=true",
                "progress=false",
            ]
        )
    )
    report = json.loads((contacts_dir / "report.json").read_text())
    test = report["folds"][0]["test"]
    head = json.loads((contacts_dir / "contact_head.json").read_text())
    assert sorted(head["training_proteins"]) == sorted(report["folds"][0]["train"]), "head and report split differ"
    scores = score_predictions(predicted, a.structures)
    reported = report["methods"][method]["mean"]["long"]["P@L"]
    per_report = {n: report["methods"][method]["per_protein"][n]["long"]["P@L"] for n in test}
    predicted_mean = float(np.mean([scores[n] for n in test]))
    result = {
        "run": str(a.run),
        "checkpoint_sha256": head["checkpoint_sha256"],
        "head_kind": kind,
        "report_method": method,
        "commands": commands,
        "n_predicted": len(scores),
        "n_test": len(test),
        "training_proteins": head["training_proteins"],
        "contacts_long_P@L": reported,
        "predict_contacts_long_P@L": predicted_mean,
        "difference": predicted_mean - reported,
        "tolerance": TOLERANCE,
        "passed": abs(predicted_mean - reported) <= TOLERANCE,
        "per_protein": {n: {"contacts": per_report[n], "predict_contacts": scores[n]} for n in test},
        "predict_contacts_all_chains_long_P@L": float(np.mean(list(scores.values()))),
    }
    if recipe_head.is_file() and (a.run / "summary.json").is_file():
        result["recipe_head_on_family_chain"] = recipe_head_on_chain(a.run, a.structures, seqs, kind, commands)
    write(RESULT, record("predict_contacts_check", result))
    print(
        f"long-range P@L over the {len(test)} test chains: contacts {reported:.4f}, predict_contacts "
        f"{predicted_mean:.4f} (difference {predicted_mean - reported:+.4f}, tolerance {TOLERANCE}): "
        f"{'PASS' if result['passed'] else 'FAIL'} -> {RESULT}"
    )


if __name__ == "__main__":
    main()
