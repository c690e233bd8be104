"""Study 2: time and memory vs sequence length of a 6-layer model (the paper's speed figure).

A PerformerLM of 6 layers, d_model 512, 8 heads (head dim 64), d_ff 1024, batch 1, with four
attention cores: exact softmax (``SoftmaxAttention``, PyTorch SDPA), FAVOR+ softmax and FAVOR+
ReLU (m = 256), exact softmax with the L x L matrix materialised (``exact_naive``, the paper's
baseline) and the identity "attention" (returns V: the cost of everything but attention, the
paper's "X (OPT)" floor). For L = 512, 1024, 2048, ... each core is timed for a forward pass (no
grad) and a forward+backward pass (cross-entropy on random tokens), until a memory cap (default
16 GB, the paper's V100) or a time cap is hit: a length whose projected time (x4 per doubling for
exact, x2 otherwise) or projected memory (the growth measured over the last doubling, between x2 and
x4) exceeds a cap is not run, nor any longer one.

Each (core, L) runs in its own subprocess, so that peak memory is its own:
- CPU: peak resident set (``ru_maxrss``) minus the resident set before the first pass; glibc is
  told to mmap every allocation of 64 KiB or more (``MALLOC_MMAP_THRESHOLD_``), so freed tensors
  leave the resident set at once and the high-water mark is that of live tensors. The forward is
  measured first, so the forward+backward peak is the later high-water mark.
- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the pass; an
  out-of-memory error ends that core's sweep.
Time: the fastest of ``--reps`` passes after one warm-up (the single pass when it takes > 3 s).

    python -m protein_performer.studies.speed                              # CPU, ~10 min
    python -m protein_performer.studies.speed --device cuda --max-length 65536 --time-cap 60
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from protein_performer.studies import reports, small_training, study_cli

log = logging.getLogger(__name__)
NAME = "speed"
CORES = ("exact", "exact_naive", "favor_softmax", "favor_relu", "identity")
QUADRATIC = {"exact", "exact_naive"}


class IdentityAttention(nn.Module):
    """The cost floor: "attention" that returns V (b, h, l, d) unchanged."""

    causal = False

    def forward(self, q, k, v, key_padding_mask=None):
        return v

    def redraw(self, seed: int) -> None:
        """No features."""


class NaiveSoftmaxAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with the L x L matrix materialised (what the paper's baseline did;
    PyTorch's SDPA, the ``exact`` core, uses memory-efficient kernels where it can)."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, key_padding_mask=None):
        scores = torch.einsum("bhld,bhkd->bhlk", q, k) * q.shape[-1] ** -0.5
        if self.causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu_(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.einsum("bhlk,bhkd->bhld", scores.softmax(dim=-1), v)

    def redraw(self, seed: int) -> None:
        """No features."""


def build(
    core: str, length: int, causal: bool, dim: int, depth: int, heads: int, ff_dim: int, nb_features: int, seed: int
):
    """The study's model for one attention core (identity = the exact model with V passed through)."""
    attention = "exact" if core in ("identity", "exact_naive") else core
    model = small_training.build_model(
        attention,
        causal,
        seed,
        vocab_size=29,
        max_len=length,
        dim=dim,
        depth=depth,
        heads=heads,
        dim_head=dim // heads,
        ff_dim=ff_dim,
        dropout=0.0,
        nb_features=nb_features,
    )
    if core == "identity":
        for block in model.blocks:
            block.attn.kernel = IdentityAttention()
    if core == "exact_naive":
        for block in model.blocks:
            block.attn.kernel = NaiveSoftmaxAttention(causal)
    return model


def measure(core: str, length: int, args: dict) -> dict:
    """Time and peak memory of one core at one length (run inside the child process)."""
    device = args["device"]
    torch.manual_seed(args["seed"])
    model = build(
        core,
        length,
        args["causal"],
        args["dim"],
        args["depth"],
        args["heads"],
        args["ff_dim"],
        args["nb_features"],
        args["seed"],
    ).to(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
    tokens = torch.randint(4, 29, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.roll(tokens, -1, dims=1)
    autocast = torch.autocast(
        device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype, enabled=dtype != torch.float32
    )

    def forward():
        with torch.no_grad(), autocast:
            model(tokens)

    def forward_backward():
        with autocast:
            logits = model(tokens)["logits"]
        loss = nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    out = {"core": core, "length": length}
    cuda = device.startswith("cuda")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for mode, fn in (("forward", forward), ("forward_backward", forward_backward)):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        try:
            first = reports.timer(fn, device)
            times = [first]
            if first < 3:
                times += [reports.timer(fn, device) for _ in range(args["reps"])]
                times = times[1:]  # the first was the warm-up
        except torch.cuda.OutOfMemoryError as e:  # only raised on CUDA
            out[mode] = {"oom": True, "error": str(e).splitlines()[0]}
            torch.cuda.empty_cache()
            continue
        peak = (
            (torch.cuda.max_memory_allocated() - base)
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
        )
        out[mode] = {"time_s": min(times), "peak_bytes": int(peak), "reps": len(times)}
    return out


CHILD_KEYS = ("device", "seed", "causal", "dim", "depth", "heads", "ff_dim", "nb_features", "dtype", "reps")


def measure_in_process(core: str, length: int, args: argparse.Namespace) -> dict:
    """``measure`` in this process (CUDA: peak memory comes from the allocator's own statistics,
    so no fresh process is needed; the CUDA start-up is paid once)."""
    try:
        return measure(core, length, {k: getattr(args, k) for k in CHILD_KEYS})
    except torch.OutOfMemoryError as e:
        return {"core": core, "length": length, "failed": f"out of memory: {str(e).splitlines()[0]}"}
    finally:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def run_child(core: str, length: int, args: argparse.Namespace, timeout: float) -> dict:
    """``measure`` in a fresh Python process (own peak memory, and a crash or OOM stays there)."""
    child_args = {k: getattr(args, k) for k in CHILD_KEYS}
    code = (
        "import json, sys, torch; from protein_performer.studies.speed import measure; "
        f"torch.set_num_threads({args.threads}); "
        f"print('RESULT ' + json.dumps(measure({core!r}, {length}, json.loads(sys.argv[1]))))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(child_args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"core": core, "length": length, "failed": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"core": core, "length": length, "failed": f"exit code {proc.returncode}: {' | '.join(tail)}"}


def sweep(args: argparse.Namespace, progress: bool = True) -> tuple[list[dict], dict]:
    """Every core, L doubling from ``min_length``; returns the rows and each core's stop reason."""
    from tqdm.auto import tqdm

    cap = args.memory_cap_gb * 2**30
    if args.device == "cpu":
        avail = _mem_available()
        if avail is not None and 0.7 * avail < cap:
            log.warning("memory cap %.1f GB lowered to 70%% of the available %.1f GB", cap / 2**30, avail / 2**30)
            cap = 0.7 * avail
    lengths = []
    length = args.min_length
    while length <= args.max_length:
        lengths.append(length)
        length *= 2
    rows, stops = [], {}
    bar = tqdm(total=len(CORES) * len(lengths), desc="speed", disable=not progress, leave=False)
    for core in args.cores:
        prev = before = None
        for length in lengths:
            bar.update()
            if prev is not None:
                t_next = prev["forward_backward"]["time_s"] * (4 if core in QUADRATIC else 2)
                m_next = prev["forward_backward"]["peak_bytes"] * memory_growth(before, prev)
                if t_next > args.time_cap:
                    stops[core] = f"L={length}: projected fwd+bwd time {t_next:.0f} s > time cap {args.time_cap:.0f} s"
                    break
                if m_next > cap:
                    stops[core] = (
                        f"L={length}: projected peak memory {m_next / 2**30:.1f} GB > cap {cap / 2**30:.1f} GB"
                    )
                    break
            if args.in_process:
                row = measure_in_process(core, length, args)
            else:
                row = run_child(core, length, args, timeout=max(60.0, 20 * args.time_cap))
            rows.append(row)
            log.info("%s", row)
            ok = "failed" not in row and all("time_s" in row.get(m, {}) for m in ("forward", "forward_backward"))
            if not ok:
                stops[core] = f"L={length}: " + (row.get("failed") or "out of memory")
                break
            if row["forward_backward"]["peak_bytes"] > cap:
                stops[core] = f"L={length}: measured peak {row['forward_backward']['peak_bytes'] / 2**30:.1f} GB > cap"
                break
            before, prev = prev, row
        else:
            stops[core] = f"reached --max-length {args.max_length}"
    bar.close()
    return rows, {"stops": stops, "memory_cap_bytes": cap, "lengths": lengths}


def memory_growth(before: dict | None, prev: dict) -> float:
    """Projected factor of peak memory per doubling of L: the measured ratio of the last two lengths,
    kept within [2, 4] (linear to quadratic); 4 before two points exist. Exact SDPA keeps no L x L
    matrix, so its memory grows linearly although its time grows quadratically."""
    if before is None or before["forward_backward"]["peak_bytes"] <= 0:
        return 4.0
    ratio = prev["forward_backward"]["peak_bytes"] / before["forward_backward"]["peak_bytes"]
    return min(4.0, max(2.0, ratio))


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def largest(rows: list[dict]) -> dict[str, int]:
    out = {}
    for r in rows:
        if "failed" not in r and "time_s" in r.get("forward_backward", {}):
            out[r["core"]] = max(out.get(r["core"], 0), r["length"])
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = reports.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for core, style in zip(CORES, ("s-", "s:", "o-", "^-", "k--")):
        pts = [r for r in rows if r["core"] == core and "failed" not in r and "time_s" in r.get("forward_backward", {})]
        if not pts:
            continue
        x = [r["length"] for r in pts]
        axes[0].loglog(x, [r["forward"]["time_s"] for r in pts], style, label=core, base=2)
        axes[1].loglog(x, [r["forward_backward"]["time_s"] for r in pts], style, label=core, base=2)
        axes[2].loglog(x, [max(r["forward_backward"]["peak_bytes"], 1) / 2**20 for r in pts], style, label=core, base=2)
    for ax, t in zip(axes, ("forward time (s)", "forward+backward time (s)", "fwd+bwd peak memory (MiB)")):
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(t)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    reports.save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = study_cli.study_parser(__doc__)
    study_cli.add_device_args(p)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--cores", nargs="+", choices=CORES, default=list(CORES))
    p.add_argument("--min-length", type=int, default=512)
    p.add_argument("--max-length", type=int, default=1 << 16)
    p.add_argument("--memory-cap-gb", type=float, default=16.0)
    p.add_argument("--time-cap", type=float, default=12.0, help="seconds for one forward+backward pass")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--causal", action="store_true", help="UNI (causal) attention instead of BID")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ff-dim", type=int, default=1024)
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    study_cli.add_output_args(p, progress=False)  # --no-progress comes last
    p.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure in this process (default: on CUDA; CPU uses a child process per point for its peak RSS)",
    )
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. _cuda)")
    p.add_argument("--no-progress", action="store_true")
    args = study_cli.parse_study_args(p, argv)
    if args.in_process is None:  # resolved here, so that --resume compares the setting itself
        args.in_process = args.device.startswith("cuda")
    return args


def run(args: argparse.Namespace) -> dict:
    if args.in_process is None:
        args.in_process = args.device.startswith("cuda")
    info, t0 = study_cli.start_study(args)
    rows, meta = sweep(args, not args.no_progress)
    name = NAME + args.tag
    result = {
        **study_cli.study_record(NAME, args, info),
        "rows": rows,
        **meta,
        "largest_length": largest(rows),
        "wall_s": time.perf_counter() - t0,
        "command": study_cli.study_command(NAME, args),
    }
    title = (
        f"{args.depth} layers, d {args.dim}, {args.heads} heads, batch 1, {args.dtype}, "
        f"{'causal' if args.causal else 'bidirectional'}, {args.device}"
    )
    study_cli.write_study(name, result, args, lambda path: plot(rows, path, title), lambda r: markdown(r, name))
    return result


def _time_table(r: dict, by: dict) -> tuple[list[str], list[list]]:
    """Header and rows of the time / memory / floor-ratio table, one row per length that ran."""
    table = []
    for length in r["lengths"]:
        row = [length]
        floor = by.get(("identity", length))
        for mode in ("forward", "forward_backward"):
            for core in CORES:
                x = by.get((core, length), {}).get(mode, {})
                row.append(f"{x['time_s']:.3g}" if "time_s" in x else "-")
        for core in CORES:
            x = by.get((core, length), {}).get("forward_backward", {})
            row.append(f"{x['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in x else "-")
        if floor and "time_s" in floor.get("forward_backward", {}):
            fb = floor["forward_backward"]["time_s"]
            for core in ("exact", "exact_naive", "favor_softmax"):
                x = by.get((core, length), {}).get("forward_backward", {})
                row.append(f"{x['time_s'] / fb:.2f}" if "time_s" in x else "-")
        else:
            row += ["-", "-", "-"]
        if any(c != "-" for c in row[1:]):
            table.append(row)
    header = (
        ["L"]
        + [f"fwd s {c}" for c in CORES]
        + [f"fwd+bwd s {c}" for c in CORES]
        + [f"peak MiB {c}" for c in CORES]
        + ["exact / floor", "exact_naive / floor", "favor_softmax / floor"]
    )
    return header, table


def _notes(r: dict, by: dict) -> list[str]:
    """What the table says about the paper's claims (time and memory against exact attention and the floor)."""
    big = r["largest_length"]
    fav = big.get("favor_softmax", 0)
    notes = []
    common_l = [
        n
        for n in r["lengths"]
        if all("time_s" in by.get((c, n), {}).get("forward_backward", {}) for c in ("exact", "favor_softmax"))
    ]
    if common_l:
        n = common_l[-1]
        e, f = by[("exact", n)]["forward_backward"], by[("favor_softmax", n)]["forward_backward"]
        notes.append(
            f"At L = {n}, the longest both ran, FAVOR+ softmax took {f['time_s'] / e['time_s']:.2f}x the time of exact SDPA "
            f"attention and {f['peak_bytes'] / max(e['peak_bytes'], 1):.2f}x its peak memory."
        )
        if f["peak_bytes"] > e["peak_bytes"]:
            notes.append(
                "The memory claim does NOT hold against PyTorch's memory-efficient exact attention (SDPA keeps no "
                "L x L matrix): FAVOR+ needs more memory than it at every length measured; the claim holds against the "
                "materialised L x L softmax (`exact_naive`), which the paper compared with."
            )
    naive = big.get("exact_naive", 0)
    if naive:
        notes.append(
            f"Materialised softmax (`exact_naive`) reaches L = {naive}; FAVOR+ softmax {fav} ({fav // naive}x)."
        )
    fl = [
        by[("favor_softmax", n)]["forward_backward"]["time_s"] / by[("identity", n)]["forward_backward"]["time_s"]
        for n in r["lengths"]
        if "time_s" in by.get(("favor_softmax", n), {}).get("forward_backward", {})
        and "time_s" in by.get(("identity", n), {}).get("forward_backward", {})
    ]
    if fl:
        notes.append(
            f"FAVOR+ softmax fwd+bwd time / identity floor: {min(fl):.1f}x to {max(fl):.1f}x over all L "
            + (
                "(a constant factor: the Performer scales like the attention-free model, as claimed)"
                if max(fl) < 4
                else "(NOT near the floor)"
            )
        )
    return notes


def markdown(r: dict, name: str) -> str:
    a = r["args"]
    by = {(x["core"], x["length"]): x for x in r["rows"]}
    header, table = _time_table(r, by)
    big = r["largest_length"]
    stops = "\n".join(
        f"- {core}: largest L = {big.get(core, 'none')}; stopped: {why}" for core, why in r["stops"].items()
    )
    fav, ex = big.get("favor_softmax", 0), big.get("exact", 0)
    verdict = (
        f"FAVOR+ softmax reaches L = {fav}, {fav // max(ex, 1)}x the exact model's L = {ex}"
        if fav > ex
        else f"FAVOR+ does NOT reach a longer L than exact attention here (FAVOR+ {fav}, exact {ex})"
    )
    notes_text = "\n".join("- " + n for n in _notes(r, by))
    return f"""## Study 2: speed and memory vs length ({a["device"]}{", " + a["dtype"] if a["dtype"] != "fp32" else ""})

Command: `{r["command"]}`
Machine: {reports.machine_line(r["machine"])}. Wall time {r["wall_s"]:.0f} s.
Model: {a["depth"]} layers, d {a["dim"]}, {a["heads"]} heads, d_ff {a["ff_dim"]}, m = {a["nb_features"]}, batch 1,
{"causal" if a["causal"] else "bidirectional"}; memory cap {r["memory_cap_bytes"] / 2**30:.1f} GB, time cap {a["time_cap"]} s per fwd+bwd.
Times: the fastest of {a["reps"]} passes after a warm-up. Peak memory: see the module docstring (CPU: resident set growth).

{reports.md_table(header, table)}

{stops}

{verdict}.
{notes_text}

The paper's claim (V100, 16 GB) is that the Performer's fwd+bwd time stays near the attention-free floor
and that it reaches L = 2^15 where regular attention runs out of memory much earlier; the "/ floor" columns show how far
each core is from the floor at every L in this run. On CPU the caps are set by time, not by memory, unless said above.
Figure: `studies/{name}.png`; data: `studies/{name}.json`.
"""


def main(argv: list[str] | None = None) -> dict:
    args = study_cli.study_args(NAME, parse_args, argv)
    result = run(args)
    print("largest L per core:", result["largest_length"])
    for core, why in result["stops"].items():
        print(f"  {core}: {why}")
    return result


if __name__ == "__main__":
    main()
