"""Ingestion throughput against Biopython's SimpleFastaParser, and 1 vs 2 workers (issue 2, section 6).

    python benchmarks/ingest.py [--input ../shared/data/swissprot2014_100k.fasta.gz] [--repeats 3]

In one run, each measurement in its own fresh Python process (so peak RSS is that of the
measurement alone; workers' RSS is read from RUSAGE_CHILDREN), best wall time of ``--repeats``
rounds; the four cases run round-robin (one of each per round), so that on a shared machine the
compared rows see the same load:

1. parse only: iterate the .gz with ``Bio.SeqIO.FastaIO.SimpleFastaParser`` (text mode), counting
   records and residues: the baseline;
2. full ingest of the .gz with 1 worker (parse, validate, tokenize, dedup, split, HDF5 shards,
   manifest);
3. on a decompressed copy (temporary directory): full ingest with 1 worker and with 2 workers.

Floors: ingest (1 worker, .gz) >= 0.5x the parse-only throughput; 2 workers >= 1.6x 1 worker on the
plain file. Prints a markdown table, writes benchmarks/results/ingest.json and ingest.md, exits 1
when a floor is missed. On a bigger machine, pin it to 2 cores: ``taskset -c 0,1 python ...``.
The parallel speedup only means something on otherwise idle cores (the load average is recorded).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import Floor, day, newest, record, source, table, write  # noqa: E402

from protein_performer.resources import shared_data  # noqa: E402

DEFAULT_INPUT = shared_data() / "swissprot2014_100k.fasta.gz"  # $PP_SHARED_DATA, or ../shared/data


COMMAND = "python benchmarks/ingest.py"
HEADING = "## Ingestion (issues 2, 10): `benchmarks/ingest.py`"


def section(rec: dict) -> str:
    """RESULTS.md's part for an ``ingest`` record: command, machine, load and the table of the four runs."""
    body = [
        [
            name,
            f"{r['wall_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{r['seq_per_s']:,.0f}",
            f"{r['res_per_s'] / 1e6:.1f} M",
            f"{r['peak_rss_mb']:.0f}",
        ]
        for name, r in rec["runs"].items()
    ]
    lines = [
        f"Command: `{rec['command']}`  ",
        f"Machine: {rec['machine']}; {day(rec['date'])}; load average {rec['load_avg_before'][0]:.1f} before, "
        f"{rec['load_avg_after'][0]:.1f} after (best of {rec['repeats']}, round-robin). Data: {source(rec)}",
        "",
    ]
    return "\n".join(lines + table(["run", "wall s", "CPU s", "sequences/s", "residues/s", "peak RSS MB"], body))


def floors(records: list[dict]) -> list[Floor]:
    """Issues 2 and 10: ingest vs parse-only throughput, 2 workers vs 1, from the latest record."""
    rec = newest(records)
    values = rec["floors"] if rec else {}
    ratio, speedup = (values.get(k, {}).get("value") for k in ("ingest_1w_gz_vs_parse_only", "plain_2w_vs_1w"))
    return [
        Floor(
            "2, 10", "1-worker ingest (.gz) / SimpleFastaParser parse-only throughput", 0.5, False, ratio, rec, COMMAND
        ),
        Floor("2, 10", "2 workers / 1 worker throughput (plain file)", 1.6, False, speedup, rec, COMMAND),
    ]


def _child(kind: str, path: str, out: str | None, workers: int) -> None:
    """Runs inside the measuring subprocess: prints one JSON line."""
    if kind == "sfp":
        from Bio.SeqIO.FastaIO import SimpleFastaParser

        t0, c0 = time.perf_counter(), time.process_time()
        n = res = 0
        with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as fh:
            for _, seq in SimpleFastaParser(fh):
                n += 1
                res += len(seq)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        from protein_performer.data.ingest import ingest

        t0, c0 = time.perf_counter(), time.process_time()
        m = ingest(input=path, output_dir=out, workers=workers, progress=False, overwrite=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = m["n_records"]
        res = sum(s["n_residues"] for s in m["splits"].values())  # residues written (unique sequences)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "wall_s": wall, "cpu_s": cpu + ch.ru_utime + ch.ru_stime, "records": n, "residues": res,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mb": ch.ru_maxrss / 1024,
    }))  # fmt: skip


def _run_once(kind: str, path: Path, out: Path | None, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(path), str(out), str(workers)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _measure_round_robin(cases: dict[str, tuple], repeats: int) -> dict[str, dict]:
    """Each case once per round, ``repeats`` rounds, so that the compared cases see the same phases
    of a shared machine's load (measuring one case's repeats, then the next, compared different
    minutes). Per case: the run with the best wall time, every wall time, the peak RSS of all runs."""
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, args in cases.items():
            runs[name].append(_run_once(*args))
    rows = {}
    for name, rs in runs.items():
        best = dict(min(rs, key=lambda x: x["wall_s"]))
        best["wall_s_all"] = [round(x["wall_s"], 3) for x in rs]
        best["peak_rss_mb"] = max(max(x["peak_rss_mb"], x["peak_rss_children_mb"]) for x in rs)
        rows[name] = best
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, path, out, workers = a.child
        _child(kind, path, out, int(workers))
        return 0
    if not a.input.is_file():
        print(f"input not found: {a.input} (the shared data folder is needed: set PP_SHARED_DATA)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="pp-ingest-bench-"))
    try:
        plain = tmp / a.input.name.removesuffix(".gz")
        with gzip.open(a.input, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        rows = _measure_round_robin(
            {
                "parse-only SimpleFastaParser (.gz)": ("sfp", a.input, None, 1),
                "ingest, 1 worker (.gz)": ("ingest", a.input, tmp / "o1gz", 1),
                "ingest, 1 worker (plain)": ("ingest", plain, tmp / "o1", 1),
                "ingest, 2 workers (plain)": ("ingest", plain, tmp / "o2", 2),
            },
            a.repeats,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    sfp, g1, p1, p2 = rows.values()
    # throughput on input records and residues read (both sides read all 100k records)
    in_res = sfp["residues"]
    for r in rows.values():
        r["seq_per_s"] = r["records"] / r["wall_s"]
        r["res_per_s"] = in_res / r["wall_s"]
    ratio_gz = g1["res_per_s"] / sfp["res_per_s"]
    speedup = p1["wall_s"] / p2["wall_s"]
    verdicts = {
        "ingest_1w_gz_vs_parse_only": {"value": ratio_gz, "floor": 0.5, "pass": ratio_gz >= 0.5},
        "plain_2w_vs_1w": {"value": speedup, "floor": 1.6, "pass": speedup >= 1.6},
    }
    cmd = f"python benchmarks/ingest.py --input {a.input} --repeats {a.repeats}"
    fields = {"input": str(a.input), "load_avg_before": load_before, "load_avg_after": load_after}
    rec = record("ingest", dict(fields, repeats=a.repeats, runs=rows, floors=verdicts), cmd=cmd)
    write(a.results / "ingest.json", rec)
    text = section(dict(rec, _path="ingest.json"))
    (a.results / "ingest.md").write_text(text + "\n")
    print(text)
    for name, floor in verdicts.items():
        print(f"{name}: {floor['value']:.2f} (floor {floor['floor']}): {'PASS' if floor['pass'] else 'FAIL'}")
    return 0 if all(f["pass"] for f in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
