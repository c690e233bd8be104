"""RESULTS.md's attention part: the tables and floors of ``attention`` records (benchmarks/attention.py).

One record per configuration (device, dtype, malloc tuning, Triton dot precision); its rows hold
time and peak memory per (method, mode, length), its scaling the FAVOR+ softmax time ratio of the two
largest lengths timed round-robin.
"""

from __future__ import annotations

from _record import Floor, day, latest, newest, source, table

HEADING = (
    "## Attention core (issues 3, 11): `benchmarks/attention.py`\n\n"
    "Forward+backward, batch 1, 8 heads, d 64, m 256: time = minimum of the round-robin rounds (peak memory "
    "MiB, ratio = median over rounds of time / exact_sdpa time in the same round). `favor_*` is "
    "`FavorAttention`'s default `impl`; `favor_softmax_scan` etc. name another `impl`."
)
COMMAND = "python benchmarks/attention.py"
TUNED_COMMAND = f"{COMMAND} --keep-freed-memory --out benchmarks/results/attention_cpu_tuned.json"
GPU_COMMAND = "bash benchmarks/gpu.sh"
PP_COMMAND = "python benchmarks/attention.py (with the `bench` extra installed)"


def key(rec: dict) -> tuple:
    """A configuration: device, dtype, malloc tuning, and the Triton dot precision when not the default
    (``PROTEIN_PERFORMER_TRITON_DOT``; gpu.sh names that run ``..._tf32x3.json``)."""
    cfg = rec["config"]
    dot = cfg.get("triton_dot") or ("tf32x3" if rec.get("_path", "").endswith("_tf32x3.json") else "")
    return cfg["device"], cfg["dtype"], bool(cfg.get("keep_freed_memory") or cfg.get("system_malloc")), dot


def value(rec: dict | None, method: str, mode: str, length: int, field: str = "ratio") -> float | None:
    """A row's ``field``; ``ratio`` is the median paired ratio to exact_sdpa (else the ratio of the times)."""
    if rec is None:
        return None
    rows = {(r["method"], r["mode"], r["length"]): r for r in rec["rows"]}
    row, base = rows.get((method, mode, length)), rows.get(("exact_sdpa", mode, length))
    if row is None or "time_s" not in row:
        return None
    if field == "ratio":
        return row.get("median_ratio", row["time_s"] / base["time_s"] if base and "time_s" in base else None)
    return row.get(field)


def _mode_table(rec: dict, mode: str) -> list[str]:
    unit, scale = ("ms", 1e3) if rec["config"]["device"] == "cuda" else ("s", 1.0)
    lengths = sorted({r["length"] for r in rec["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in rec["rows"]))
    rows = {(r["method"], r["mode"], r["length"]): r for r in rec["rows"]}
    body = []
    for method in methods:
        cells = [method]
        for length in lengths:
            r = rows.get((method, mode, length), {})
            if "time_s" not in r:
                cells.append(r.get("skipped", "-") if isinstance(r.get("skipped"), str) else "-")
                continue
            ratio = value(rec, method, mode, length)
            extra = "" if method == "exact_sdpa" or ratio is None else f", {ratio:.2f}x"
            cells.append(f"{r['time_s'] * scale:.3g} {unit} ({r['peak_mem_mb']:.0f} MiB{extra})")
        body.append(cells)
    return [f"**{mode}**", ""] + table(["method", *(f"L={n}" for n in lengths)], body) + [""]


def section(rec: dict) -> str:
    """One configuration: its heading, command, machine, date, a table per mode, scaling and notes."""
    cfg = rec["config"]
    _, _, tuned, dot = key(rec)
    setting = "with malloc tuning" if tuned else "plain process (as a user runs it)"
    setting += f", Triton dots {dot}" if dot else ""
    threads = f"{cfg.get('threads', '?')} threads" if cfg["device"] == "cpu" else cfg.get("gpu", "?")
    out = [
        f"### {cfg['device'].upper()}, {cfg['dtype']}, {threads}, {setting}",
        "",
        f"Command: `{rec['command']}`  ",
        f"Machine: {rec['machine']}; {day(rec['date'])}. Data: {source(rec)}",
        "",
    ]
    for mode in cfg["modes"]:
        out += _mode_table(rec, mode)
    scaling = [f"{s['mode']} {s['ratio']:.2f}" for s in rec.get("scaling", [])]
    if scaling:
        lengths = rec["scaling"][0]["lengths"]
        out.append(f"- favor_softmax time({lengths[1]}) / time({lengths[0]}), timed round-robin: " + ", ".join(scaling))
    out += [f"- {note}" for note in rec.get("notes", [])]
    return "\n".join(out).rstrip()


def _scaling(rec: dict | None, mode: str) -> float | None:
    return next((s["ratio"] for s in (rec or {}).get("scaling", []) if s["mode"] == mode), None)


def _memory_ratio(rec: dict | None) -> float | None:
    causal = value(rec, "favor_softmax", "causal", 16384, "peak_mem_mb")
    bidirectional = value(rec, "favor_softmax", "bidirectional", 16384, "peak_mem_mb")
    return causal / bidirectional if causal and bidirectional else None


def _performer_pytorch_floor(records: list[dict]) -> Floor:
    """Issue 3's ratio to performer-pytorch, from the newest CPU record that has it (the `bench` extra)."""
    measured = [r for r in records if r["config"]["device"] == "cpu" and value(r, "performer_pytorch", "causal", 4096)]
    rec = newest(measured)
    ratio = None
    if rec:
        ratio = value(rec, "favor_softmax", "causal", 4096, "time_s") / value(
            rec, "performer_pytorch", "causal", 4096, "time_s"
        )
    what = "CPU L=4096 causal FAVOR+ softmax / performer-pytorch time"
    return Floor("3", what, 0.1, True, ratio, rec, PP_COMMAND)


def floors(records: list[dict]) -> list[Floor]:
    """Issues 3 and 11: the latest plain and tuned CPU records, the newest with performer-pytorch, the GPU's."""
    by_key = {key(r): r for r in latest(records, key)}
    plain, tuned = by_key.get(("cpu", "fp32", False, "")), by_key.get(("cpu", "fp32", True, ""))
    out = [
        Floor("3", f"CPU L=8192 {mode} FAVOR+ softmax / SDPA time", limit, True, value(plain, *case), plain, COMMAND)
        for mode, limit, case in (
            ("causal", 0.4, ("favor_softmax", "causal", 8192)),
            ("bidirectional", 0.2, ("favor_softmax", "bidirectional", 8192)),
        )
    ]
    out += [
        Floor("3", f"CPU {mode} time(16384) / time(8192)", 2.3, True, _scaling(plain, mode), plain, COMMAND)
        for mode in ("causal", "bidirectional")
    ]
    out += [
        Floor(
            "3",
            "same, with malloc tuning (keep_freed_memory)",
            2.3,
            True,
            _scaling(tuned, "bidirectional"),
            tuned,
            TUNED_COMMAND,
        ),
        Floor("3", "CPU L=16384 causal / bidirectional peak memory", 2.0, True, _memory_ratio(plain), plain, COMMAND),
        _performer_pytorch_floor(records),
    ]
    variants = sorted({r["method"] for r in (plain or {}).get("rows", []) if r["method"].startswith("favor_softmax_")})
    for impl in ("favor_softmax", *variants):
        label = "default impl (auto)" if impl == "favor_softmax" else f'`impl="{impl.removeprefix("favor_softmax_")}"`'
        for mode, limit in (("causal", 0.30), ("bidirectional", 0.15)):
            what = f"CPU plain L=8192 {mode} / SDPA, {label}"
            out.append(Floor("11", what, limit, True, value(plain, impl, mode, 8192), plain, COMMAND))
    return out + _gpu_floors(by_key.get(("cuda", "bf16", False, "")))


def _gpu_floors(gpu: dict | None) -> list[Floor]:
    """Issue 11's H200 table: the best FAVOR+ softmax impl in the run against flash SDPA, per case."""

    def best(mode: str, length: int, field: str = "ratio") -> float | None:
        if gpu is None:
            return None
        impls = {r["method"] for r in gpu["rows"] if r["method"].startswith("favor_softmax")}
        values = [v for m in impls if (v := value(gpu, m, mode, length, field)) is not None]
        if field == "peak_mem_mb" and values:
            return min(values) / value(gpu, "exact_sdpa", mode, length, field)
        return min(values) if values else None

    cases = [("causal", 1024, 2.0), ("causal", 4096, 1.0), ("causal", 16384, 0.5), ("bidirectional", 4096, 0.5)]
    out = [
        Floor(
            "11",
            f"H200 bf16 L={n} {mode} FAVOR+ / flash SDPA time (best impl)",
            limit,
            True,
            best(mode, n),
            gpu,
            GPU_COMMAND,
        )
        for mode, n, limit in cases
    ]
    what = "H200 bf16 L=65536 causal FAVOR+ / flash SDPA peak memory"
    return out + [Floor("11", what, 3.0, True, best("causal", 65536, "peak_mem_mb"), gpu, GPU_COMMAND)]
