"""RESULTS.md's part for the ``contacts_kortemme40`` record (issue 5): unsupervised contact prediction of
the learning check's models on kortemme40.

No script writes this record: its ``command`` is the chain of project commands that produced it (export
the maps of each model and of a random-init one, then ``contacts``), separated by `` && ``.
"""

from __future__ import annotations

from _record import Floor, day, fmt, source, table

HEADING = "## Unsupervised contact prediction on kortemme40 (issue 5)"
COLUMNS = ["long P@L", "long P@L/5", "medium P@L", "short P@L"]


def section(rec: dict) -> str:
    """The models, protocol, commands, machine and date, the P@L table per model and predictor, the notes."""
    body = [[r["model"], r["predictor"], *(fmt(r[c]) for c in COLUMNS)] for r in rec["summary"]]
    body.append(["(contact density)", "", *(fmt(rec["contact_density"][c]) for c in COLUMNS)])
    lines = [
        f"Models: {rec['models']}. Protocol: {rec['protocol']}.",
        "",
        "Commands:",
        "```",
        *rec["command"].split(" && "),
        "```",
        f"Machine: {rec['machine']}; {day(rec['date'])}. Data: {source(rec)}; per protein: "
        f"`results/{rec['per_protein']}`.",
        "",
    ]
    lines += table(["model", "predictor", *COLUMNS], body) + [""] + [f"- {n}" for n in rec["notes"]]
    return "\n".join(lines)


def floors(records: list[dict]) -> list[Floor]:
    """None: issue 5 names no number."""
    return []
