"""The end-to-end demo behind ``make demo``: every stage through its real command line.

    python -m protein_performer.demo [output_dir=demo_out] [structures=<PDB/mmCIF folder>]
                                     [max_time=00:00:04:00] [steps=N] [stages=ingest,train,export,contacts,aa]

1. ingest the embedded sample into sharded HDF5, holding out two Pfam families as OOD;
2. train the ``demo`` experiment (a small BID Performer-ReLU) with W&B offline;
3. export the attention maps of the trained model and of a random-init twin for the structures;
4. unsupervised contact prediction against the structures, next to the random-init baseline;
5. amino-acid attention against BLOSUM62;
6. print a summary (and write it to ``<output_dir>/summary.json``).

Each stage is the same ``python -m protein_performer.<stage>`` a user would type, so the demo
also shows the commands (they are printed before they run). A bad option or a failed stage is one
line ``error: demo: ...`` on stderr and exit code 1.

The sample (sequences, Pfam hits, and the 8 structures that ``structures`` defaults to) ships inside
the package (``protein_performer/sample_data``, the repository's ``data/``), so the demo runs the
same from a checkout and from an installed wheel. Relative paths are relative to the directory you
run from. ``steps=N`` trains N steps instead of the demo experiment's ``max_time`` (a quick check).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from string import Template

from protein_performer.errors import UserError, cli_errors
from protein_performer.resources import PACKAGE, SAMPLE_DATA, STRUCTURES

# The pipeline, as data: each stage runs its commands in order, each as ``python -m <arguments>``.
# An argument is a template ($name) over the options below, the FILES below and $data (the package's
# sample); a pair (option, template) is an argument given only when that option is set.
_EXPORT = ["crop=center", "progress=false", "num_threads=1"]
# fmt: off
PIPELINE: dict[str, list[list[str | tuple[str, str]]]] = {
    "ingest": [
        ["protein_performer.ingest", "input=[$data/uniprot_sample.fasta.gz,$data/swissprot_sample.fasta.gz]",
         "output_dir=$shards", "annotations=$data/swissprot_sample.pfam_hits.tsv", "ood_families=[RRM_1,globins4]",
         "fractions={train: 0.9, valid: 0.05, test: 0.05}", "overwrite=true", "progress=false"],
    ],
    "train": [
        ["protein_performer.train", "experiment=demo", "data.root=$shards", "hydra.run.dir=$run_dir",
         "trainer.max_time=$max_time",
         # steps=N: a shorter run (the tests use it); the demo experiment's own default otherwise
         ("steps", "trainer.max_steps=$steps"), ("steps", "trainer.val_check_interval=$steps"),
         ("steps", "module.warmup_steps=0")],
    ],
    "export": [  # the trained model's maps, and those of a random-init twin (the baseline)
        ["protein_performer.export_attention", "checkpoint=$checkpoint", "input=$structures", "output=$maps",
         *_EXPORT],
        ["protein_performer.export_attention", "checkpoint=random", "model_config=$checkpoint",
         "input=$structures", "output=$maps_random", *_EXPORT],
    ],
    "contacts": [
        ["protein_performer.contacts", "maps=$maps", "baseline_maps=$maps_random", "structures=$structures",
         "output_dir=$contacts"],
    ],
    "aa": [
        ["protein_performer.export_attention", "checkpoint=$checkpoint", "input=$data/swissprot_sample.fasta.gz",
         "output=$maps_sequences", "max_sequences=300", "include=[attentions]", *_EXPORT],
        ["protein_performer.aa_similarity", "maps=$maps_sequences", "output_dir=$aa_similarity"],
    ],
}
# fmt: on
STAGES = tuple(PIPELINE)  # the pipeline order, whatever the order of the stages= option
# The options (key=value on the command line) and their defaults.
OPTIONS = {
    "output_dir": "demo_out",
    "structures": str(STRUCTURES),
    "max_time": "00:00:04:00",
    "steps": "",
    "stages": ",".join(STAGES),
}
# Where the stages write, under output_dir.
FILES = {
    "log": "demo.log",
    "shards": "shards",
    "run_dir": "train",
    "checkpoint": "train/checkpoints/last.ckpt",
    "maps": "maps.h5",
    "maps_random": "maps_random.h5",
    "maps_sequences": "maps_sequences.h5",
    "contacts": "contacts",
    "aa_similarity": "aa_similarity",
}


def _parse(argv: list[str]) -> dict[str, str] | None:
    """The demo's ``key=value`` options over their defaults; None for ``--help`` / ``-h``."""
    if any(arg in ("--help", "-h") for arg in argv):
        return None
    opts = dict(OPTIONS)
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"demo: expected key=value, got {arg!r} (keys: {', '.join(opts)})")
        key, value = arg.split("=", 1)
        if key not in opts:
            raise UserError(f"demo: unknown option {key!r} (keys: {', '.join(opts)})")
        opts[key] = value
    if opts["steps"]:
        try:
            opts["steps"] = str(int(opts["steps"]))
        except ValueError:
            raise UserError(f"demo: steps={opts['steps']} is not a whole number") from None
    return opts


def stage_commands(stage: str, values: dict[str, str]) -> list[list[str]]:
    """The ``python -m`` arguments of the commands one stage runs, in order, with ``values`` filled in."""
    commands = []
    for template in PIPELINE[stage]:
        args = []
        for arg in template:
            if isinstance(arg, tuple):
                option, arg = arg
                if not values[option]:
                    continue
            args.append(Template(arg).substitute(values))
        commands.append(args)
    return commands


def _env() -> dict[str, str]:
    """The stages import the same protein_performer as the demo (a checkout run without installing)."""
    path = [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def _check_inputs(opts: dict[str, str], stages: list[str]) -> None:
    """A missing sample file or structures folder is one clear error before any stage runs."""
    for path in (SAMPLE_DATA / "uniprot_sample.fasta.gz", SAMPLE_DATA / "swissprot_sample.fasta.gz"):
        if {"ingest", "aa"} & set(stages) and not path.is_file():
            raise UserError(f"demo: sample file not found: {path} (the package's sample_data/ is incomplete)")
    if {"export", "contacts"} & set(stages) and not Path(opts["structures"]).exists():
        raise UserError(f"demo: structures={opts['structures']} not found (a folder of PDB / mmCIF files)")


def _run(args: list[str], log: Path) -> None:
    """One command as ``python -m <args>``: shown, its output appended to ``log`` and its tail printed."""
    cmd = [sys.executable, "-m", *args]
    print("\n$ " + " ".join(shlex.quote(a) for a in ["python", "-m", *args]), flush=True)
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    tail = "\n".join(proc.stdout.rstrip().splitlines()[-25:])
    print(tail, flush=True)
    if proc.returncode != 0:
        raise UserError(f"demo: stage failed (exit {proc.returncode}); full output in {log}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@cli_errors
def main(argv: list[str] | None = None) -> None:
    opts = _parse(sys.argv[1:] if argv is None else argv)
    if opts is None:
        print(__doc__.strip())
        return
    stages = [s for s in opts["stages"].split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UserError(f"demo: unknown stages {unknown}; choose from {STAGES}")
    _check_inputs(opts, stages)
    out = Path(opts["output_dir"])
    if not out.is_absolute():
        out = Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / path for name, path in FILES.items()}
    values = {**opts, **{name: str(path) for name, path in files.items()}, "data": str(SAMPLE_DATA)}
    t_start = time.time()
    for stage in STAGES:
        if stage in stages:
            for args in stage_commands(stage, values):
                _run(args, files["log"])
    summary = {
        "manifest": _load(files["shards"] / "manifest.json").get("splits", {}),
        "train": _load(files["run_dir"] / "metrics.json"),
        "contacts": {m: v["mean"] for m, v in _load(files["contacts"] / "report.json").get("methods", {}).items()},
        "aa_similarity": _load(files["aa_similarity"] / "aa_similarity.json"),
        "seconds": round(time.time() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary, out)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_summary(s: dict, out: Path) -> None:
    print("\n================ protein_performer demo: summary ================")
    if s["manifest"]:
        print(
            "shards: "
            + ", ".join(
                f"{k} {v.get('n_sequences', 0):,} seqs / {v.get('n_residues', 0):,} res"
                for k, v in s["manifest"].items()
            )
        )
    train = s["train"]
    if train:
        print(f"\n{'split':<6} {'metric':<11} {'model':>8} {'unigram':>8}")
        for split in ("valid", "test", "ood"):
            for metric in ("acc", "ppl"):
                model = train.get(f"{split}/{metric}")
                base = train.get(f"{split}/unigram_{metric}")
                if model is not None:
                    print(f"{split:<6} {metric:<11} {_fmt(model):>8} {_fmt(base):>8}")
    if s["contacts"]:
        print("\nunsupervised contact precision, mean over proteins (cross-validated):")
        print(f"{'method':<24} {'short P@L':>10} {'medium P@L':>11} {'long P@L':>9} {'long P@L/5':>11}")
        for method, mean in s["contacts"].items():
            print(
                f"{method:<24} {mean['short']['P@L']:>10.3f} {mean['medium']['P@L']:>11.3f} "
                f"{mean['long']['P@L']:>9.3f} {mean['long']['P@L/5']:>11.3f}"
            )
    aa = s["aa_similarity"]
    if aa:
        best = aa.get("best_head", {})
        print(
            f"\namino-acid attention vs BLOSUM62 over {aa.get('n_sequences')} sequences: "
            f"all heads Pearson {aa['all_heads']['pearson']:.3f}; best head (layer {best.get('layer')}, "
            f"head {best.get('head')}) Pearson {best.get('pearson', float('nan')):.3f}"
        )
    print(f"\nall outputs under {out} ({s['seconds']} s); W&B offline run: {out / 'train' / 'wandb'}")


if __name__ == "__main__":
    main()
