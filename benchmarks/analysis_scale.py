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

Modes: ``forward`` (``model(tokens)``, no grad), ``dense`` (export include=[attentions,apc] of one
map, ``layers=[0] heads=[0]``: every head of every layer would be 2 x layers x heads x L^2 x 2 bytes,
206 GB at L 32,768),
``apc_mean`` (include=[apc_mean] reduce=all), ``contacts`` (include=[apc_mean,contacts] reduce=all,
the issue's 36-layer setting), ``predict`` (predict_contacts, top-L pairs, a random contact head),
``embed`` (the final representation's mean, the pass ``embed`` makes). The sequence is a random
one of L residues (seed 0). Writes one record (benchmarks/_record.py; default
benchmarks/results/analysis_scale_<model>_L<longest length>.json) and prints its RESULTS.md section
(each mode's time / forward time); ``floors()`` reads issue 20's numbers from the records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import RESULTS, Floor, day, fmt, newest, record, source, table, when, write  # noqa: E402

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
    "dense": (["attentions", "apc"], {"layers": [0], "heads": [0]}),
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


HEADING = (
    "## Attention analysis against length (issue 20): `benchmarks/analysis_scale.py`\n\n"
    "Per mode: time / the bare forward's at the same L, peak RSS of its own process, output size. `dense`: export "
    "include=[attentions,apc] layers=[0] heads=[0] (one map); `apc_mean`: include=[apc_mean] reduce=all; `contacts`: "
    "include=[apc_mean,contacts] reduce=all; `predict`: predict_contacts, top-L pairs; `embed`: the mean embedding."
)
PAPER_L = (900, 1100)  # "L ~ 1,000" for the paper model's floors
LONG_MB = 2048.0  # peak RSS floor at L 16,384 (plus the dense output's own size)
COMMANDS = {
    "paper": "python benchmarks/analysis_scale.py --model paper --lengths 1000 --modes forward,contacts",
    "long": "python benchmarks/analysis_scale.py --model long --lengths 16384,32768",
    "predict": "python benchmarks/analysis_scale.py --model long --lengths 35000 --modes forward,predict",
}


def key(rec: dict) -> tuple:
    """One configuration per model and set of lengths."""
    return rec["model"], tuple(sorted({r["length"] for r in rec["rows"]}))


def section(rec: dict) -> str:
    """RESULTS.md's part for an ``analysis_scale`` record: one row per L, per mode its time / the
    forward's, peak RSS and output size (the forward's own seconds and RSS in the first column)."""
    modes = [m for m in MODES if m != "forward" and any(r["mode"] == m for r in rec["rows"])]
    body = []
    for length in sorted({r["length"] for r in rec["rows"]}):
        at = {r["mode"]: r for r in rec["rows"] if r["length"] == length}
        fwd = at.get("forward", {})
        row = [f"{length:,}", f"{fmt(fwd.get('seconds'), 2)} s, {fwd.get('peak_rss_mb', 0):.0f} MB" if fwd else "-"]
        for mode in modes:
            r = at.get(mode)
            if r is None or "error" in r:
                row.append(r["error"] if r else "-")
                continue
            ratio = f"{r['seconds'] / fwd['seconds']:.1f}x" if fwd.get("seconds") else f"{r['seconds']:.1f} s"
            out = f", {r['bytes'] / 1e6:.1f} MB out" if r["bytes"] else ""
            row.append(f"{ratio}, {r['peak_rss_mb']:.0f} MB{out}")
        body.append(row)
    m = rec["model_config"]
    lines = [
        f"Command: `{rec['command']}`; machine: {rec['machine']}; {day(rec['date'])}. Model `{rec['model']}`: "
        f"{m['attention']} {m['depth']} x "
        f"{m['dim']}, {m['heads']} heads, causal {m['causal']}; tile {rec['tile']}. Data: {source(rec)}",
        "",
    ]
    return "\n".join(lines + table(["L", "forward", *modes], body))


def _rows(records: list[dict], model: str, mode: str, lo: int, hi: int) -> tuple[dict | None, dict | None]:
    """The newest record of ``model`` with a measured ``mode`` row at a length in [lo, hi], and that row."""
    ok = [rec for rec in records if rec["model"] == model]
    for rec in sorted(ok, key=lambda rec: when(rec["date"]), reverse=True):
        for r in rec["rows"]:
            if r["mode"] == mode and lo <= r["length"] <= hi and "seconds" in r:
                return rec, r
    return (newest(ok), None) if ok else (None, None)


def _forward(rec: dict, length: int) -> float | None:
    return next((r["seconds"] for r in rec["rows"] if r["mode"] == "forward" and r["length"] == length), None)


def _long_rss(records: list[dict], length: int) -> tuple[dict | None, dict[str, float]]:
    """The newest long-model record at ``length`` and each analysis mode's peak RSS (MB) there, the
    dense mode's less its output's size."""
    rec, _ = _rows(records, "long", "forward", length, length)
    rec = rec or newest([r for r in records if r["model"] == "long"])
    rss = {}
    for r in rec["rows"] if rec else ():
        if r["length"] == length and r["mode"] != "forward" and "peak_rss_mb" in r:
            rss[r["mode"]] = r["peak_rss_mb"] - (r["bytes"] / 2**20 if r["mode"] == "dense" else 0.0)
    return rec, rss


def floors(records: list[dict]) -> list[Floor]:
    """Issue 20: the paper model's contacts export at L ~ 1,000 (time / forward, MB per sequence), the
    long model's peak RSS at L 16,384 and its growth to 32,768, predict_contacts at L 35,000."""
    rec, row = _rows(records, "paper", "contacts", *PAPER_L)
    fwd = _forward(rec, row["length"]) if row else None
    paper = "36-layer paper model, L ~ 1,000, include=[apc_mean,contacts] reduce=all"
    out = [
        Floor("20", f"{paper}: time / bare forward", 5.0, True, row["seconds"] / fwd if fwd else None, rec),
        Floor("20", f"{paper}: output MB per sequence", 10.0, True, row["bytes"] / 1e6 if row else None, rec),
    ]
    rec16, rss16 = _long_rss(records, 16384)
    rec32, rss32 = _long_rss(records, 32768)
    growth = [rss32[m] / rss16[m] for m in rss16 if m in rss32 and m != "dense"]
    out += [
        Floor("20", "long model, L 16,384: peak RSS MB of export / predict / embed (dense: less its output)",
              LONG_MB, True, max(rss16.values()) if rss16 else None, rec16),
        Floor("20", "long model: peak RSS(32,768) / RSS(16,384), non-dense modes", 2.2, True,
              max(growth) if growth else None, rec32),
    ]  # fmt: skip
    rec35, row35 = _rows(records, "long", "predict", 35000, 35000)
    out += [
        Floor("20", "predict_contacts, L 35,000, top pairs: minutes", 30.0, True,
              row35["seconds"] / 60 if row35 else None, rec35),
        Floor("20", "predict_contacts, L 35,000, top pairs: peak RSS GB", 4.0, True,
              row35["peak_rss_mb"] / 1024 if row35 else None, rec35),
    ]  # fmt: skip
    commands = [COMMANDS["paper"]] * 2 + [COMMANDS["long"]] * 2 + [COMMANDS["predict"]] * 2
    for f, cmd in zip(out, commands):
        f.command = cmd
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="long")
    ap.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    ap.add_argument("--out", help="the record (default benchmarks/results/analysis_scale_<model>_L<longest>.json)")
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
    fields = {
        "model": args.model,
        "model_config": MODELS[args.model],
        "tile": args.tile,
        "threads": torch.get_num_threads(),
    }
    rec = record("analysis_scale", {**fields, "rows": rows})
    out = Path(args.out or RESULTS / f"analysis_scale_{args.model}_L{max(lengths)}.json")
    print(section({**rec, "_path": out.name}))
    print(f"-> {write(out, rec)}")


if __name__ == "__main__":
    main()
