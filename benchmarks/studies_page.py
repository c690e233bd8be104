"""The studies' part of RESULTS.md and the page benchmarks/results/studies.md, from the JSON files the
studies (``python -m protein_performer.studies.<study>``, ``make studies``) write into
benchmarks/results/studies/. Their format is the studies' own (``machine`` is a dict with ``date_utc``);
each section of the page is rendered by its study module's ``markdown()``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from _record import RESULTS, load, table

# The studies in the order of the priorities (5, 1, 2, 3, 4); a `_cuda` twin follows each.
STUDIES = ("causal_generation", "approximation", "speed", "compatibility", "redraw")
HEADING = (
    "## Studies: the paper's claims at workstation scale (issue 6)\n\n"
    "`python -m protein_performer.studies.<study>` (`make studies`); each writes "
    "`results/studies/<study>.json` + `.png`. Full tables, commands and readings: "
    "[`results/studies.md`](results/studies.md), generated from those JSON files."
)


def runs(root: Path = RESULTS) -> list[dict]:
    """The studies' JSON under ``root``/studies, in STUDIES order, each followed by its ``_cuda`` twin."""
    names = [n for s in STUDIES for n in (s, f"{s}_cuda")]
    return [load(root / "studies" / f"{n}.json", root) for n in names if (root / "studies" / f"{n}.json").exists()]


def _name(run: dict) -> str:
    return Path(run["_path"]).stem


def _machine(run: dict) -> str:
    m = run["machine"]
    return f"{m.get('gpu') or m['cpu']}, {m['torch_threads']} torch threads"


def headline(run: dict) -> str:
    """The study's key numbers, computed from its JSON."""
    kind = run["study"]
    if kind == "causal_generation":
        eq, last = run["equality"]["float64"], run["timing"][-1]
        return (
            f"float64 logits equal to {eq['stream_all_positions_max_abs_logit_diff']:.1e} over "
            f"{eq['stream_length']} tokens; per token at L={last['prefix_length']}: recurrent "
            f"{last['speedup_recurrent_vs_recompute']:.1f}x faster than recompute, "
            f"{last['favor_recurrent_s'] / last['exact_kv_cache_s']:.1f}x the time of an exact KV cache"
        )
    if kind == "approximation":
        parts = [
            f"{name}: orthogonal < iid {c['orthogonal_below_iid_positive_mse_attn']['fraction']:.0%}, "
            f"positive < trig on small entries {c['positive_below_trig_small_entries']['fraction']:.0%}"
            for name, c in ((n, r["claims"]) for n, r in run["results"].items())
        ]
        return "; ".join(parts) + " of the m values"
    if kind == "speed":
        largest = run["largest_length"]
        by = {(r["core"], r["length"]): r["forward_backward"].get("time_s") for r in run["rows"]}
        floor = [
            by[("favor_softmax", n)] / by[("identity", n)]
            for n in run["lengths"]
            if by.get(("favor_softmax", n)) and by.get(("identity", n))
        ]
        return (
            f"largest L: FAVOR+ softmax {largest.get('favor_softmax')}, exact SDPA {largest.get('exact')}, "
            f"materialised softmax {largest.get('exact_naive')}; FAVOR+ softmax fwd+bwd "
            f"{min(floor):.1f}-{max(floor):.1f}x the attention-free floor"
        )
    if kind == "compatibility":
        exact, swap = run["exact"]["acc"], run["after_swap"]
        return "; ".join(
            f"{a}: {100 * (s['acc_mean'] - exact):+.2f} points at the swap, "
            f"{100 * run['finetune'][a][-1]['acc']:.2f}% after fine-tune "
            f"(exact control {100 * run['finetune']['exact'][-1]['acc']:.2f}%)"
            for a, s in swap.items()
        )
    if kind == "redraw":
        fixed, redrawn = run["summary"]["fixed"]["loss"]["values"], run["summary"]["redrawn"]["loss"]["values"]
        wins = sum(r < f for f, r in zip(fixed, redrawn))
        return f"redrawn features lower valid loss in {wins} of {len(fixed)} paired seeds"
    return ""


def section(studies: list[dict]) -> str:
    """RESULTS.md's studies part: one row per study with device, machine, date and its key numbers."""
    body = [
        [
            f"[{_name(r)}](results/studies.md#{_name(r).replace('_', '-')})",
            r["machine"]["device"],
            _machine(r),
            r["machine"]["date_utc"],
            headline(r),
        ]
        for r in studies
    ]
    return "\n".join([HEADING, "", *table(["study", "device", "machine", "date", "measured"], body)])


def _render(run: dict) -> str:
    """The study's own markdown section (the function its module uses), from the JSON alone."""
    name = _name(run)
    module = importlib.import_module(f"protein_performer.studies.{run['study']}")
    takes_name = len(inspect.signature(module.markdown).parameters) > 1
    text = module.markdown(run, name) if takes_name else module.markdown(run)
    lines = [line for line in text.rstrip().splitlines() if not line.startswith("Figure:")]
    if lines and lines[0].startswith("## "):
        lines[0] = lines[0] + (" (cuda)" if name.endswith("_cuda") and "cuda" not in lines[0] else "")
    lines += [f"- {note}" for note in run.get("notes", [])]
    lines.append(
        f"Figure: [`studies/{name}.png`](studies/{name}.png); data: [`studies/{name}.json`](studies/{name}.json)."
    )
    return "\n".join([f'<a id="{name.replace("_", "-")}"></a>', "", *lines])


def page(studies: list[dict], generated: str) -> str:
    """benchmarks/results/studies.md: every study's section, under the ``generated`` marker."""
    head = [
        "# Studies: the paper's claims at workstation scale (issue 6)",
        "",
        generated,
        "",
        "Each section is rendered by its study's own `markdown()` from `studies/<study>.json`; the `_cuda` "
        "sections ran with `--device cuda --tag _cuda`. Summary: [`../RESULTS.md`](../RESULTS.md#studies-the-papers-"
        "claims-at-workstation-scale-issue-6).",
        "",
    ]
    return "\n".join(head) + "\n" + "\n\n".join(_render(r) for r in studies) + "\n"
