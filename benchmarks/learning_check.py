"""Learning check on real data: demo-size BID models trained on Swiss-Prot (100k sequences).

    python benchmarks/learning_check.py [--minutes 20] [--workdir /tmp/pp_learning]
                                        [--models performer_relu,performer_softmax,transformer]

1. ingests ``../shared/data/swissprot2014_100k.fasta.gz`` (36 M residues; RRM_1 and globins4
   held out as OOD through the Pfam hits annotation);
2. trains the ``demo`` experiment (2 layers, d 128, 4 heads, BID) once per attention kind, all at
   the same time, one thread each, for the same wall-clock budget, validating every 250 steps on
   a fixed subset of the valid split;
3. compares the models at equal steps (the largest step every model reached) and against the
   unigram baseline; writes ``benchmarks/results/learning_check.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import Floor, day, newest, record, source, table, write  # noqa: E402

from protein_performer.resources import shared_data  # noqa: E402

SHARED = shared_data()  # $PP_SHARED_DATA, or ../shared/data beside the checkout
RESULTS = REPO / "benchmarks" / "results"


HEADING = "## Learning check on real data (issue 4): `benchmarks/learning_check.py`"


def section(rec: dict) -> str:
    """RESULTS.md's part for a ``learning_check`` record: final and equal-step accuracy per model."""
    final, equal, step = rec["final"], rec["at_equal_step"], rec["equal_step"]
    body = [
        [
            name,
            x["global_step"],
            f"{100 * x['valid/acc']:.2f}",
            f"{x['valid/ppl']:.2f}",
            f"{100 * equal[name]['valid/acc']:.2f}",
            f"{equal[name]['valid/ppl']:.2f}",
        ]
        for name, x in final.items()
    ]
    any_model = next(iter(final.values()))
    unigram = [f"{100 * any_model['valid/unigram_acc']:.2f}", f"{any_model['valid/unigram_ppl']:.2f}"]
    body.append(["unigram baseline", "", *unigram, "", ""])
    lines = [
        f"Command: `{rec['command']}`  ",
        f"Machine: {rec['machine']}; {day(rec['date'])}. {rec.get('setup', '')} Data: {source(rec)}; "
        "curve: [`learning_check.png`](results/learning_check.png)",
        "",
    ]
    header = ["model", "steps", "valid acc %", "valid ppl", f"acc % at step {step}", f"ppl at step {step}"]
    return "\n".join(lines + table(header, body))


def floors(records: list[dict]) -> list[Floor]:
    """Issue 4: every model's valid masked accuracy clearly above the unigram baseline's (latest record)."""
    rec = newest(records)
    worst = min((x["valid/acc"] / x["valid/unigram_acc"] for x in rec["final"].values()), default=None) if rec else None
    what = 'valid masked acc / unigram acc, worst model ("clearly above", read as >= 1.5)'
    return [Floor("4", what, 1.5, False, worst, rec, "python benchmarks/learning_check.py")]


def read_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    """valid/acc and valid/ppl per step from the CSV logger's metrics.csv."""
    curve: dict[int, dict[str, float]] = {}
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return curve
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if row.get("valid/acc"):
                step = int(float(row["step"]))
                curve[step] = {k: float(row[k]) for k in ("valid/acc", "valid/ppl") if row.get(k)}
    return curve


def plot(curves: dict, finals: dict, models: list[str], minutes: float) -> None:
    """results/learning_check.png: valid accuracy per step of each model, and the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, c in curves.items():
        steps = sorted(c)
        ax.plot(steps, [100 * c[s]["valid/acc"] for s in steps], marker="o", ms=3, label=m)
    base = finals[models[0]].get("valid/unigram_acc")
    if base:
        ax.axhline(100 * base, color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("training step")
    ax.set_ylabel("valid masked accuracy (%)")
    ax.set_title(f"BID demo-size models on Swiss-Prot 100k ({minutes:g} min, 1 thread each)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "learning_check.png", dpi=120)


def markdown_table(curves: dict, finals: dict, at_equal: dict, step_eq: int | None) -> str:
    """results/learning_check.md: steps, final and equal-step accuracy and perplexity per model."""
    models = list(finals)
    lines = [
        "| model | steps reached | valid acc % (final) | valid ppl (final) | valid acc % at step "
        f"{step_eq} | valid ppl at step {step_eq} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        f, e = finals[m], at_equal.get(m, {})
        steps = max(curves[m]) if curves[m] else 0
        lines.append(
            f"| {m} | {steps} | {100 * f.get('valid/acc', float('nan')):.2f} | {f.get('valid/ppl', float('nan')):.2f} "
            f"| {100 * e.get('valid/acc', float('nan')):.2f} | {e.get('valid/ppl', float('nan')):.2f} |"
        )
    f0 = finals[models[0]]
    lines.append(
        f"| unigram baseline | | {100 * f0.get('valid/unigram_acc', float('nan')):.2f} "
        f"| {f0.get('valid/unigram_ppl', float('nan')):.2f} | | |"
    )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--workdir", default="/tmp/pp_learning")
    ap.add_argument("--models", default="performer_relu,performer_softmax,transformer")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--val-batches", type=int, default=25)
    return ap.parse_args()


def main() -> None:
    """Ingest, train the models at once, compare them; write results/learning_check.{json,md,png}."""
    args = parse_args()
    fasta = SHARED / "swissprot2014_100k.fasta.gz"
    if not fasta.exists():
        sys.exit(f"learning_check: {fasta} not found (set PP_SHARED_DATA, or put ../shared/data beside the repo)")
    work = Path(args.workdir)
    shards = work / "shards"
    py = sys.executable
    t0 = time.time()
    if not (shards / "manifest.json").exists():
        subprocess.run(
            [
                py,
                "-m",
                "protein_performer.ingest",
                f"input={fasta}",
                f"output_dir={shards}",
                f"annotations={SHARED / 'annotations' / 'swissprot2014_100k.pfam_hits.tsv'}",
                "ood_families=[RRM_1,globins4]",
                "overwrite=true",
                "progress=false",
            ],
            check=True,
            cwd=REPO,
        )
    ingest_s = time.time() - t0
    hhmmss = time.strftime("%H:%M:%S", time.gmtime(int(args.minutes * 60)))
    procs = {}
    models = args.models.split(",")
    for model in models:
        run_dir = work / model
        cmd = [
            py,
            "-m",
            "protein_performer.train",
            "experiment=demo",
            f"model={model}",
            f"data.root={shards}",
            f"hydra.run.dir={run_dir}",
            f"name=learning_{model}",
            "logger=csv",
            "num_threads=1",
            f"trainer.max_time=00:{hhmmss}",
            "trainer.max_steps=1000000",
            f"trainer.val_check_interval={args.val_every}",
            f"trainer.limit_val_batches={args.val_batches}",
            "module.schedule=constant",
            "callbacks.checkpoint.every_n_train_steps=100000",
            "test=false",
        ]
        log = open(work / f"{model}.log", "w")
        procs[model] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
    for model, (p, log) in procs.items():
        rc = p.wait()
        log.close()
        if rc != 0:
            sys.exit(f"learning_check: training {model} failed (exit {rc}); see {work / (model + '.log')}")

    curves = {m: read_curve(work / m) for m in models}
    finals = {m: json.loads((work / m / "metrics.json").read_text()) for m in models}
    common = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
    step_eq = common[-1] if common else None
    result = {
        "minutes": args.minutes,
        "ingest_seconds": round(ingest_s, 1),
        "equal_step": step_eq,
        "at_equal_step": {m: curves[m].get(step_eq, {}) for m in models} if step_eq else {},
        "final": finals,
        "curves": {m: {str(k): v for k, v in c.items()} for m, c in curves.items()},
        "manifest": json.loads((shards / "manifest.json").read_text())["splits"],
    }
    result["manifest"] = {k: {kk: v[kk] for kk in ("n_sequences", "n_residues")} for k, v in result["manifest"].items()}
    write(RESULTS / "learning_check.json", record("learning_check", result))

    plot(curves, finals, models, args.minutes)
    table = markdown_table(curves, finals, result["at_equal_step"], step_eq)
    print(table)
    (RESULTS / "learning_check.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
