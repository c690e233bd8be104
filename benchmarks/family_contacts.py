"""Which settings make attention maps of a family model trained for minutes on 2 CPU cores carry
contacts (issue 12, item 3)? Each setting is one run of the recipe
(``python -m protein_performer.family_contacts``) with Hydra overrides; its score is the
long-range P@L of the unsupervised mean-of-heads APC map on the family's kortemme40 chain, next to
the same model at random init, and the ContactProbe curve (precision vs training minutes).

    python benchmarks/family_contacts.py --family PF00072 --minutes 4 --settings relu4,exact4 [--parallel 2]
    python benchmarks/family_contacts.py --report          # only rebuild the JSON / .md / PNG
    python benchmarks/family_contacts.py --head --family PF00072,PF00550 --settings relu4 --minutes 13

``--head`` runs the recipe's ``contacts`` stage on finished runs (``stages=contacts``: maps of all
kortemme40 chains, the ``contacts`` report and saved head, and the head fitted leave-family-out, i.e.
on chains of other families and scored on the family's chain) and adds it to their rows.
``--import-runs <json>`` appends the runs of another results file (e.g. one written by a copy of the
tree) that are not here yet.

Every run is kept in benchmarks/results/family_contacts.json (keyed by family/setting/minutes, with
command, machine, date and load); the .md table and the PNG are rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _record import machine, now, record, write

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
JSON = RESULTS / "family_contacts.json"
MD = RESULTS / "family_contacts.md"
PNG = RESULTS / "family_contacts.png"

# name -> Hydra overrides on top of experiment=family_contacts (4 x 128 Performer-ReLU, 4 heads, m 64,
# learned positions, 15% masking in single residues, batch 32, lr 3e-3, redraw every 1000 steps)
FLOOR_FAMILIES = ("PF00072", "PF00550", "PF00486", "PF00076", "PF00226")  # the five largest kortemme40 families
ALIGNED = ["experiment=family_contacts_aligned", "align=true"]
SETTINGS: dict[str, list[str]] = {
    "relu4": [],
    "exact4": ["model=transformer", "model.favor_kwargs={}"],
    "softmax4": ["model=performer_softmax"],
    "exact1": ["model=transformer", "model.favor_kwargs={}", "model.depth=1"],
    "exact2": ["model=transformer", "model.favor_kwargs={}", "model.depth=2"],
    "relu1": ["model.depth=1"],
    "relu2": ["model.depth=2"],
    "relu4_mask30": ["data.mask_prob=0.3"],
    "exact4_mask30": ["model=transformer", "model.favor_kwargs={}", "data.mask_prob=0.3"],
    "relu4_rotary": ["model.positions=rotary"],
    "relu4_heads8": ["model.heads=8", "model.dim_head=16"],
    "relu4_dim64": ["model.dim=64", "model.dim_head=16", "model.ff_dim=128"],
    "relu4_bs64_lr1e-2": ["data.batch_size=64", "module.lr=1e-2", "module.warmup_steps=200"],
    "relu4_m256": ["model.nb_features=256"],
    "relu4_noredraw": ["callbacks.redraw.redraw_interval=0"],
    "relu4_lr1e-2": ["module.lr=1e-2", "module.warmup_steps=200"],
    "relu4_span3": ["data.span=3"],
    "relu4_span5": ["data.span=5"],
    "relu4_span8": ["data.span=8"],
    "relu4_mask40": ["data.mask_prob=0.4"],
    "relu4_depth3": ["model.depth=3"],
    "relu4_depth6": ["model.depth=6"],
    # factored attention (experiment=family_contacts_aligned: 1 layer, 32 heads, queries and keys learned
    # per position) on the family aligned to the chain; no ``contacts`` stage: its maps are the family's
    "aligned_exact": [*ALIGNED, "model.attention=exact"],
    # (model: factored is exact attention: the FAVOR+ twins name the m 64 they were measured with)
    "aligned_relu": [*ALIGNED, "model.attention=favor_relu", "model.nb_features=64"],
    "aligned_softmax": [*ALIGNED, "model.attention=favor_softmax", "model.nb_features=64"],
}


def _model_overrides(setting: str) -> list[str]:
    """Settings may combine named ones with '+': exact2+mask30 -> exact2's overrides + relu4_mask30's."""
    out: list[str] = []
    for part in setting.split("+"):
        if part in SETTINGS:
            out += SETTINGS[part]
        elif f"relu4_{part}" in SETTINGS:
            out += SETTINGS[f"relu4_{part}"]
        else:
            raise SystemExit(f"unknown setting {part!r}; known: {', '.join(SETTINGS)}")
    return out


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def launch(
    family: str,
    setting: str,
    minutes: float,
    out_root: Path,
    threads: int,
    probe_s: float,
    extra: list[str],
    homologs: int = 0,
) -> tuple[subprocess.Popen, dict]:
    out = out_root / f"{family}_{setting}_{minutes:g}min"
    mm, ss = divmod(int(round(minutes * 60)), 60)
    args = [
        "-m",
        "protein_performer.family_contacts",
        f"family={family}",
        f"output_dir={out}",
        f"probe_every_s={probe_s}",
        f"num_threads={threads}",
        f"homologs={homologs}",
        f"trainer.max_time=00:00:{mm:02d}:{ss:02d}",
        *_model_overrides(setting),
        *extra,
    ]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "run.log", "w")
    meta = {
        "family": family,
        "setting": setting,
        "minutes": minutes,
        "output_dir": str(out),
        "overrides": _model_overrides(setting) + extra,
        "threads": threads,
        "command": "python " + " ".join(shlex.quote(a) for a in args),
        "date": now(),
        "load_start": loadavg(),
    }
    print(f"start {family} {setting} {minutes:g} min -> {out}", flush=True)
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT), meta


def collect(meta: dict, rc: int, wall: float, parallel: int) -> dict:
    out = Path(meta["output_dir"])
    row = dict(meta, rc=rc, wall_s=round(wall, 1), load_end=loadavg(), runs_at_once=parallel, machine=machine())
    sp = out / "summary.json"
    if rc == 0 and sp.exists():
        s = json.loads(sp.read_text())
        row.update(
            {
                k: s.get(k)
                for k in (
                    "headline",
                    "train",
                    "probe",
                    "extract",
                    "seconds",
                    "shards",
                    "homolog_averaged",
                    "fitted_head",
                )
            }
        )
        row["extract"] = {k: v for k, v in (row.get("extract") or {}).items() if k != "held_out"}
        if not row.get("fitted_head"):
            row.pop("fitted_head", None)
        sc = s.get("scores", {})
        row["layers_long_P@L"] = {k: v["long"]["P@L"] for k, v in sc.get("trained", {}).items()}
        row["random_layers_long_P@L"] = {k: v["long"]["P@L"] for k, v in sc.get("random_init", {}).items()}
        row["trained_scores"] = sc.get("trained", {}).get("mean")
        if "couplings_long_P@L" in (s.get("headline") or {}):  # one layer of factored attention
            c = sc["couplings"]["long"]
            row["couplings"] = {"long_P@L": c["P@L"], "long_P@L/5": c["P@L/5"]}
    else:
        row["error"] = (out / "run.log").read_text()[-2000:] if (out / "run.log").exists() else "no log"
    return row


def run_head(family: str, setting: str, minutes: float, out_root: Path, threads: int) -> None:
    """The recipe's ``contacts`` stage on a finished run; its ``fitted_head`` goes into the run's row."""
    out = out_root / f"{family}_{setting}_{minutes:g}min"
    args = [
        "-m",
        "protein_performer.family_contacts",
        f"family={family}",
        f"output_dir={out}",
        "stages=contacts",
        "overwrite=true",  # the stage may have run before: its new outputs replace the old when complete
        f"num_threads={threads}",
        *(o for o in _model_overrides(setting) if o.startswith("align=")),  # an aligned model's head names its chain
    ]
    command = "python " + " ".join(shlex.quote(a) for a in args)
    print(f"head {family} {setting} {minutes:g} min: {command}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)
    summary = json.loads((out / "summary.json").read_text())
    res = load_results()
    rows = [r for r in res["runs"] if r.get("output_dir") == str(out) and r.get("headline")]
    if not rows:
        raise SystemExit(f"no finished run with output_dir {out} in {JSON}; run it (or --import-runs) first")
    rows[-1]["fitted_head"] = dict(
        summary["fitted_head"],
        command=command,
        wall_s=round(time.time() - t0, 1),
        date=now(),
    )
    save_results(res)


def import_runs(path: Path) -> None:
    """Append the runs of another results JSON that are not here (same output_dir and date)."""
    res = load_results()
    seen = {(r.get("output_dir"), r.get("date")) for r in res["runs"]}
    new = [r for r in json.loads(path.read_text())["runs"] if (r.get("output_dir"), r.get("date")) not in seen]
    res["runs"] += new
    save_results(res)
    print(f"imported {len(new)} runs from {path}")


def load_results() -> dict:
    return json.loads(JSON.read_text()) if JSON.exists() else {"runs": []}


def save_results(res: dict) -> None:
    """Write the runs as the ``family_contacts`` record, stamped with this command, machine and date."""
    fields = {k: v for k, v in res.items() if k not in ("benchmark", "command", "machine", "date")}
    write(JSON, record("family_contacts", fields))


def report(res: dict) -> None:
    runs = [r for r in res["runs"] if r.get("headline")]
    lines = [
        "# Family-level contacts from attention (issue 12, item 3)",
        "",
        "Score: long-range (|i-j| >= 24) P@L of the unsupervised mean-of-heads APC map of the family's "
        "kortemme40 chain (no fitted weights); random init: the same architecture untrained. "
        "Generated by `benchmarks/family_contacts.py` (command of each run in family_contacts.json).",
        "",
        "| family | setting | min | CPU s | threads | runs at once | load (1 min, start) | steps | valid acc | "
        "long P@L | long P@L/5 | random init | best layer | density | homolog-avg (random) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        h, t = r["headline"], r.get("train") or {}
        layers = {k: v for k, v in (r.get("layers_long_P@L") or {}).items() if k.startswith("layer")}
        best = max(layers.items(), key=lambda kv: kv[1]) if layers else ("-", float("nan"))
        acc = t.get("valid/acc")
        acc_s = f"{acc:.3f}" if acc is not None else "-"
        lines.append(
            f"| {r['family']} | {r['setting']} | {r['minutes']:g} | {r.get('cpu_s', '-')} | {r['threads']} | "
            f"{r.get('runs_at_once')} | "
            f"{(r.get('load_start') or ['?'])[0]} | {t.get('global_step')} | {acc_s} | "
            f"{h['long_P@L']:.3f} | {h['long_P@L/5']:.3f} | {h['random_long_P@L']:.3f} | "
            f"{best[0]} {best[1]:.3f} | {h['long_density']:.3f} | {_homolog(r)} |"
        )
    lines += _means(runs)
    lines += head_table(runs)
    failed = [r for r in res["runs"] if not r.get("headline")]
    if failed:
        lines += ["", "Failed runs: " + ", ".join(f"{r['family']}/{r['setting']} (rc {r.get('rc')})" for r in failed)]
    if res.get("notes"):
        lines += ["", *res["notes"]]
    MD.write_text("\n".join(lines) + "\n")
    _plot(runs)


def _means(runs: list[dict]) -> list[str]:
    """The issue's floor per (setting, minutes) run on all five families: mean long P@L vs random init."""
    rows = []
    for (setting, minutes), group in sorted(_latest_per_family(runs).items()):
        if {r["family"] for r in group} >= set(FLOOR_FAMILIES):
            pick = [next(r for r in group if r["family"] == f) for f in FLOOR_FAMILIES]
            trained = sum(r["headline"]["long_P@L"] for r in pick) / len(pick)
            rand = sum(r["headline"]["random_long_P@L"] for r in pick) / len(pick)
            ok = trained >= 0.20 and trained >= 4 * rand
            rows.append(
                f"| {setting} | {minutes:g} | **{trained:.3f}** | {rand:.3f} | {trained / max(rand, 1e-9):.1f}x | "
                f"{'PASS' if ok else 'FAIL'} |"
            )
    if not rows:
        return []
    return [
        "",
        f"Floor (mean over {', '.join(FLOOR_FAMILIES)}: long P@L >= 0.20 and >= 4x random init; latest run per family):",
        "",
        "| setting | min | mean long P@L | random init | ratio | floor |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def head_table(runs: list[dict]) -> list[str]:
    """The fitted contact head next to the unsupervised map, per run, and the mean over families of
    each (setting, minutes) with every family's latest run."""
    rows = [r for r in runs if r.get("fitted_head")]
    if not rows:
        return []
    lines = [
        "",
        "## Fitted contact head, leave-family-out (issue 12's second number)",
        "",
        "Head: ESM's L1 logistic regression (C = 0.15, standardized maps) fitted on 20 kortemme40 chains of "
        "*other* families (mean over 5 seeded draws), scored on the family's chain; 'contacts CV' is the "
        "`contacts` step's report on the same model's maps of the kortemme40 chains that fit its 126 "
        "positions (20 training chains, the rest tested; the head it saves is the one `predict_contacts` uses). "
        "Long-range P@L throughout.",
        "",
        "| family | setting | min | unsupervised mean APC | random init | head, leave-family-out | "
        "head on random init | draws (trained) | contacts CV (trained / random, n chains) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h, fh = r["headline"], r["fitted_head"]
        lfo, cv = fh["leave_family_out"], fh["contacts_report"]
        draws = " ".join(f"{x:.2f}" for x in lfo["trained"]["draws_long_P@L"])
        lines.append(
            f"| {r['family']} | {r['setting']} | {r['minutes']:g} | {h['long_P@L']:.3f} | "
            f"{h['random_long_P@L']:.3f} | {lfo['trained']['mean']['long']['P@L']:.3f} | "
            f"{lfo['random_init']['mean']['long']['P@L']:.3f} | {draws} | "
            f"{cv['trained']['P@L']:.3f} / {cv['random_init']['P@L']:.3f} ({fh['n_proteins']}) |"
        )
    for (setting, minutes), group in sorted(_latest_per_family(rows).items()):
        if len(group) < 2:
            continue
        mean = {
            k: sum(v) / len(v)
            for k, v in {
                "unsup": [r["headline"]["long_P@L"] for r in group],
                "random": [r["headline"]["random_long_P@L"] for r in group],
                "head": [r["fitted_head"]["leave_family_out"]["trained"]["mean"]["long"]["P@L"] for r in group],
                "head_random": [
                    r["fitted_head"]["leave_family_out"]["random_init"]["mean"]["long"]["P@L"] for r in group
                ],
            }.items()
        }
        lines.append(
            f"| **mean of {len(group)}** | {setting} | {minutes:g} | **{mean['unsup']:.3f}** | "
            f"{mean['random']:.3f} | **{mean['head']:.3f}** | {mean['head_random']:.3f} | | |"
        )
    return lines


def _latest_per_family(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    latest: dict[tuple[str, float, str], dict] = {}
    for r in rows:
        latest[(r["setting"], r["minutes"], r["family"])] = r
    groups: dict[tuple[str, float], list[dict]] = {}
    for (setting, minutes, _), r in latest.items():
        groups.setdefault((setting, minutes), []).append(r)
    return groups


def _homolog(r: dict) -> str:
    ha = r.get("homolog_averaged")
    if not ha:
        return "-"
    return f"{ha['trained']['long']['P@L']:.3f} ({ha['random_init']['long']['P@L']:.3f})"


def _plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({r["family"] for r in runs})
    ncols = min(3, len(fams))
    nrows = -(-len(fams) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(fams) :]:
        ax.axis("off")
    for ax, fam in zip(axes.flat, fams):
        for r in [r for r in runs if r["family"] == fam and r.get("probe")]:
            xs = [p["minutes"] for p in r["probe"]]
            ys = [p["long_P@L"] for p in r["probe"]]
            ax.plot(xs, ys, marker=".", lw=1, label=f"{r['setting']} ({r['minutes']:g} min)")
        ax.set_title(f"{fam}: mean-of-heads APC map")
        ax.set_xlabel("training minutes (2-core machine, shared)")
        ax.set_ylabel("long-range P@L")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(PNG, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="PF00072", help="one or more, comma-separated")
    p.add_argument("--settings", default="relu4", help=f"comma-separated, '+' combines; known: {', '.join(SETTINGS)}")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--probe-s", type=float, default=30.0)
    p.add_argument("--out", default="/tmp/family_contacts_runs")
    p.add_argument("--homologs", type=int, default=0, help="also score the map averaged over N aligned family members")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every run")
    p.add_argument("--report", action="store_true", help="only rebuild the .md and PNG")
    p.add_argument("--head", action="store_true", help="fit and score the contact head on finished runs")
    p.add_argument("--import-runs", type=Path, help="append the runs of another results JSON")
    a = p.parse_args(argv)
    if a.import_runs:
        import_runs(a.import_runs)
    if a.head:
        for f in a.family.split(","):
            for s in a.settings.split(","):
                run_head(f, s, a.minutes, Path(a.out), a.threads)
    res = load_results()
    if not (a.report or a.head or a.import_runs):
        jobs = [(f, s) for f in a.family.split(",") for s in a.settings.split(",")]
        running: list[tuple[subprocess.Popen, dict, float]] = []
        while jobs or running:
            while jobs and len(running) < a.parallel:
                f, s = jobs.pop(0)
                proc, meta = launch(f, s, a.minutes, Path(a.out), a.threads, a.probe_s, a.override, a.homologs)
                running.append((proc, meta, time.time()))
            time.sleep(2)
            for item in list(running):
                proc, meta, t0 = item
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)  # reaps it; rusage = its CPU time
                if pid:
                    running.remove(item)
                    rc = os.waitstatus_to_exitcode(status)
                    row = collect(meta, rc, time.time() - t0, a.parallel)
                    row["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 1)
                    res = load_results()  # reread: other invocations (and notes) may have written since
                    res["runs"].append(row)
                    save_results(res)
                    h = row.get("headline")
                    print(
                        f"done {meta['family']} {meta['setting']}: "
                        + (
                            f"long P@L {h['long_P@L']:.3f} (random {h['random_long_P@L']:.3f}), "
                            f"steps {row['train'].get('global_step')}, valid acc {row['train'].get('valid/acc')}"
                            if h
                            else f"FAILED rc {rc}"
                        ),
                        flush=True,
                    )
    report(res)


if __name__ == "__main__":
    main()
