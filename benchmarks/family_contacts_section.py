"""RESULTS.md's family-contacts part (issue 12): the ``family_contacts`` record of
benchmarks/family_contacts.py, one entry in ``runs`` per (family, setting, minutes) run.

Shown: the latest run per family of the recipe's setting, a line per setting run on all five families,
and the floors on the five families' mean long-range P@L.
"""

from __future__ import annotations

from _record import Floor, day, fmt, latest, newest, source, table
from family_contacts import FLOOR_FAMILIES as FIVE_FAMILIES

HEADING = "## Family-level contacts (issue 12): `benchmarks/family_contacts.py`"
COMMAND = "python benchmarks/family_contacts.py"
RECIPE_SETTING = (
    "aligned_relu"  # what `make family-contacts` runs: factored Performer-ReLU attention on the aligned family
)
RECIPE_MINUTES = 10  # ... for this long
# (setting, minutes) summed up, one line each when run on all five (every run: family_contacts.md):
# the recipe, FAVOR+ in its place at equal budget, and the content-attention model
FAMILY_GROUPS = ((RECIPE_SETTING, RECIPE_MINUTES), ("aligned_exact", 10), ("aligned_softmax", 10), ("relu4", 13))
INTRO = (
    "Score: long-range (|i-j| >= 24) P@L of the unsupervised mean-of-heads APC map on the family's kortemme40 "
    "chain; random init = the same architecture untrained; homolog-avg = that map averaged with 64 aligned "
    "family members; head = ESM's L1 logistic regression fitted on chains of other families. Latest run per "
    f"family of the recipe ({RECIPE_SETTING}: one layer of factored attention on the family aligned to "
    "the chain); the 4 x 128 content-attention Performer-ReLU (relu4) in one line below; every run (and the "
    "sweep of other settings) with its command, load and CPU time in "
    "[`family_contacts.md`](results/family_contacts.md)."
)
HEADER = [
    "family",
    "setting",
    "min",
    "threads",
    "runs at once",
    "CPU s",
    "steps",
    "long P@L",
    "random init",
    "homolog-avg (random)",
    "head, leave-family-out (random)",
    "date",
]


def _latest_runs(rec: dict) -> list[dict]:
    return latest(rec["runs"], lambda r: (r["family"], r["setting"], r["minutes"]))


def _row(r: dict) -> list:
    head, homolog = r["headline"], (r.get("homolog_averaged") or {})
    homolog_text = "-"
    if homolog:
        homolog_text = f"{fmt(homolog['trained']['long']['P@L'])} ({fmt(homolog['random_init']['long']['P@L'])})"
    fitted = (r.get("fitted_head") or {}).get("leave_family_out")
    fitted_text = "-"
    if fitted:
        fitted_text = (
            f"{fmt(fitted['trained']['mean']['long']['P@L'])} ({fmt(fitted['random_init']['mean']['long']['P@L'])})"
        )
    return [
        r["family"],
        r["setting"],
        f"{r['minutes']:g}",
        r["threads"],
        r["runs_at_once"],
        fmt(r.get("cpu_s"), 0) if r.get("cpu_s") else "-",
        r["train"]["global_step"],
        fmt(head["long_P@L"]),
        fmt(head["random_long_P@L"]),
        homolog_text,
        fitted_text,
        day(r["date"]),
    ]


def section(rec: dict) -> str:
    """The recipe's latest run per family, older runs with more CPU time, and the five-family means."""
    runs = _latest_runs(rec)
    shown = [r for r in runs if (r["setting"], r["minutes"]) == (RECIPE_SETTING, RECIPE_MINUTES)]
    shown.sort(key=lambda r: (r["family"] not in FIVE_FAMILIES, r["family"], r["setting"]))
    lines = [f"{INTRO} Data: {source(rec)}", ""] + table(HEADER, [_row(r) for r in shown]) + [""]
    lines += _more_compute(rec["runs"], shown)
    texts = [t for t in (_five_family_text(runs, *group) for group in FAMILY_GROUPS) if t]
    if texts:
        lines += ["- " + ". ".join(texts) + "."]
    return "\n".join(lines).rstrip()


def floors(records: list[dict]) -> list[Floor]:
    """Issue 12: the recipe's mean long P@L over the five families, and its ratio to random init's."""
    if not records:
        return [Floor("12", "five families: mean long P@L", 0.2, False, None, None, COMMAND)]
    rec = newest(records)
    mean, random = _five_family_mean(_latest_runs(rec), RECIPE_SETTING, RECIPE_MINUTES)
    what = f"five families ({RECIPE_SETTING}, {RECIPE_MINUTES} min, latest run each): mean long P@L"
    ratio = mean / random if mean is not None and random else None
    return [
        Floor("12", what, 0.2, False, mean, rec),
        Floor("12", "same, mean long P@L / random init's", 4.0, False, ratio, rec),
    ]


def _five_family_runs(runs: list[dict], setting: str, minutes: float) -> dict[str, dict] | None:
    picked = {
        r["family"]: r
        for r in runs
        if (r["setting"], r["minutes"]) == (setting, minutes) and r["family"] in FIVE_FAMILIES
    }
    return picked if len(picked) == len(FIVE_FAMILIES) else None


def _five_family_mean(runs: list[dict], setting: str, minutes: float) -> tuple[float | None, float | None]:
    picked = _five_family_runs(runs, setting, minutes)
    if picked is None:
        return None, None
    n = len(picked)
    return (
        sum(r["headline"]["long_P@L"] for r in picked.values()) / n,
        sum(r["headline"]["random_long_P@L"] for r in picked.values()) / n,
    )


def _five_family_text(runs: list[dict], setting: str, minutes: float) -> str | None:
    """One line per setting run on all five families: means of the map, homolog-averaged map and head."""
    picked = _five_family_runs(runs, setting, minutes)
    if picked is None:
        return None
    mean, random = _five_family_mean(runs, setting, minutes)
    load = {(r["threads"], r["runs_at_once"]) for r in picked.values()}
    how = ", ".join(f"{t} thread{'s' * (t != 1)}, {n} at once" for t, n in sorted(load))
    steps = sum(r["train"]["global_step"] for r in picked.values()) / len(picked)
    text = (
        f"Five families, {setting} {minutes:g} min ({how}; latest run each, {steps:.0f} steps on average): "
        f"mean long P@L {mean:.3f} vs {random:.3f} random init"
    )
    homologs = [r["homolog_averaged"] for r in picked.values() if r.get("homolog_averaged")]
    if len(homologs) == len(FIVE_FAMILIES):
        trained = sum(h["trained"]["long"]["P@L"] for h in homologs) / len(homologs)
        untrained = sum(h["random_init"]["long"]["P@L"] for h in homologs) / len(homologs)
        text += f"; homolog-averaged map {trained:.3f} vs {untrained:.3f}"
    fitted = [r["fitted_head"]["leave_family_out"] for r in picked.values() if "fitted_head" in r]
    if len(fitted) == len(FIVE_FAMILIES):
        trained = sum(f["trained"]["mean"]["long"]["P@L"] for f in fitted) / len(fitted)
        untrained = sum(f["random_init"]["mean"]["long"]["P@L"] for f in fitted) / len(fitted)
        text += f"; head, leave-family-out {trained:.3f} vs {untrained:.3f}"
    return text


def _more_compute(runs: list[dict], shown: list[dict]) -> list[str]:
    """Older runs of a shown (family, setting) that had more CPU time than the latest one: worth a line."""
    notes = []
    for latest_run in shown:
        older = [
            r
            for r in runs
            if (r["family"], r["setting"]) == (latest_run["family"], latest_run["setting"])
            and r.get("cpu_s", 0) > latest_run.get("cpu_s", 0) > 0
        ]
        for r in sorted(older, key=lambda r: r["date"]):
            homolog = (r.get("homolog_averaged") or {}).get("trained", {}).get("long", {}).get("P@L")
            notes.append(
                f"{r['family']} {r['setting']} {day(r['date'])}, {r['minutes']:g} min, {r.get('cpu_s'):.0f} CPU s, "
                f"{r['train']['global_step']} steps: long P@L {fmt(r['headline']['long_P@L'])}"
                + (f", homolog-avg {fmt(homolog)}" if homolog is not None else "")
            )
    return [f"- An earlier run with more CPU time than the latest: {'; '.join(notes)}."] if notes else []
