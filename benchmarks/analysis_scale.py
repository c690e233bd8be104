"""Attention analysis against length (issue 20): time, output bytes and peak RSS of export (dense,
apc_mean, contacts), predict_contacts (top pairs) and the mean embedding, each beside the model's
bare forward pass at the same L, every measurement in its own subprocess (peak RSS from
``os.wait4``'s resource usage of that child alone).

    python benchmarks/analysis_scale.py                                   # the issue's settings
    python benchmarks/analysis_scale.py --model long --lengths 512,1024 --modes forward,contacts --out /tmp/x.json

Models (random init, seed 0; the speed and memory do not depend on the weights):
- ``paper``: the paper's 36-layer BID Performer-ReLU (d 512, 8 heads, m 256), max_len 1024;
- ``long``: the ``trembl_concat_8192`` shape (6 layers, d 512, 8 heads, m 256, Performer-ReLU,
  causal) with rotary positions, so any length runs whole.

Modes: ``forward`` (``model(tokens)``, no grad), ``dense`` (export include=[attentions,apc]),
``apc_mean`` (include=[apc_mean] reduce=all), ``contacts`` (include=[apc_mean,contacts] reduce=all,
the issue's 36-layer setting), ``predict`` (predict_contacts, top-L pairs, a random contact head),
``embed`` (the final representation's mean, the pass ``embed`` makes). The sequence is a random
one of L residues (seed 0). Writes JSON (default benchmarks/results/analysis_scale.json) and prints
a table with each mode's time / forward time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protein_performer.analysis.contacts.head import ContactHead  # noqa: E402
from protein_performer.analysis.contacts.predict import predict_contacts  # noqa: E402
from protein_performer.analysis.export import SequenceRecord, export_attention, run_sequence  # noqa: E402
from protein_performer.data.tokenizer import Tokenizer  # noqa: E402
from protein_performer.model.performer import PerformerConfig, PerformerLM  # noqa: E402

COMMON = {"dim": 512, "heads": 8, "dim_head": 64, "ff_dim": 1024, "nb_features": 256, "dropout": 0.0}
MODELS = {
    "paper": {**COMMON, "depth": 36, "attention": "favor_relu", "causal": False, "max_len": 1024},
    "long": {**COMMON, "depth": 6, "attention": "favor_relu", "causal": True, "max_len": 8192, "positions": "rotary"},
}
MODES = ("forward", "dense", "apc_mean", "contacts", "predict", "embed")
EXPORTS = {
    "dense": (["attentions", "apc"], {}),
    "apc_mean": (["apc_mean"], {"reduce": "all"}),
    "contacts": (["apc_mean", "contacts"], {"reduce": "all"}),
}


def sequence(length: int) -> str:
    """A random protein of ``length`` residues (the 20 standard amino acids, seed 0)."""
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    return "".join(np.random.default_rng(0).choice(letters, size=length))


def child(mode: str, model_name: str, length: int, tile: int, workdir: Path) -> dict:
    """Run one measurement in this process; returns seconds and output bytes."""
    torch.manual_seed(0)
    model = PerformerLM(PerformerConfig(**MODELS[model_name])).eval()
    seq = sequence(length)
    residues = Tokenizer().encode(seq)
    t0 = time.perf_counter()
    out_bytes = 0
    if mode == "forward":
        ids, _ = Tokenizer().frame(residues, bool(model.config.causal))
        with torch.no_grad():
            model(torch.as_tensor(ids)[None])
    elif mode == "embed":
        run_sequence(model, residues, None, want_repr=True).mean(0)
    elif mode == "predict":
        cfg = model.config
        n = cfg.depth * cfg.heads
        rng = np.random.default_rng(0)
        head = ContactHead(cfg.depth, cfg.heads, rng.normal(size=n), 0.0, np.zeros(n), np.ones(n))
        pred = next(predict_contacts(model, head, [("x", seq)], check_checkpoint=False, dense_max=0))
        out_bytes = sum(a.nbytes for a in pred.pairs)
    else:
        include, sel = EXPORTS[mode]
        out = workdir / f"{mode}_{length}.h5"
        export_attention(
            model, [SequenceRecord("x", seq)], out, include=include, progress=False, selection={**sel, "tile": tile}
        )
        out_bytes = out.stat().st_size
        out.unlink()
    return {"seconds": time.perf_counter() - t0, "bytes": out_bytes}


def measure(mode: str, model_name: str, length: int, tile: int, workdir: Path, timeout: float) -> dict:
    """One mode in a subprocess: its result and its own peak RSS (``ru_maxrss`` of that child)."""
    cmd = [sys.executable, __file__, "--child", mode, "--model", model_name, "--lengths", str(length)]
    cmd += ["--tile", str(tile), "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            return {"mode": mode, "length": length, "error": f"timed out after {timeout:.0f} s"}
        time.sleep(0.05)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"mode": mode, "length": length, "error": err.strip().splitlines()[-1] if err.strip() else "failed"}
    res = json.loads(out.strip().splitlines()[-1])
    return {"mode": mode, "length": length, **res, "peak_rss_mb": usage.ru_maxrss / 1024}


def table(rows: list[dict]) -> str:
    lines = ["| L | mode | time (s) | / forward | output (MB) | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    fwd = {r["length"]: r["seconds"] for r in rows if r["mode"] == "forward" and "seconds" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['mode']} | {r['error']} | | | |")
            continue
        ratio = r["seconds"] / fwd[r["length"]] if r["length"] in fwd else float("nan")
        lines.append(
            f"| {r['length']} | {r['mode']} | {r['seconds']:.2f} | {ratio:.2f} | {r['bytes'] / 1e6:.2f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="long")
    ap.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "analysis_scale.json"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.model, lengths[0], args.tile, Path(args.workdir))))
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown} (known: {MODES})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="analysis_scale_") as tmp:
        for length in lengths:
            for mode in ["forward"] + [m for m in modes if m != "forward"]:
                rows.append(measure(mode, args.model, length, args.tile, Path(tmp), args.timeout))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    result = {
        "benchmark": "analysis_scale",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "model": args.model,
        "model_config": MODELS[args.model],
        "tile": args.tile,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
