"""Training throughput: Performer (FAVOR+ softmax, FAVOR+ ReLU) vs the exact Transformer, one run.

A training step is what ``ProteinLM.training_step`` does on a BID batch: forward, masked-LM
cross-entropy, backward, gradient clipping at 0.5 and an AdamW step. Model: 4 layers, d 256,
4 heads of 64, d_ff 512, m 256 random features (the same shape for all three attentions).
Batches hold ``tokens_per_step`` tokens of full-length real protein crops (no padding; the
key-padding mask is passed, all False, as the DataModule does). The three models are timed in
turns (round robin) so that a change in machine load hits all of them alike; the table reports
the median step time and tokens/s, and each Performer's speed-up over the exact model.

    python benchmarks/train_throughput.py [--lengths 1024 4096] [--steps 3] [--threads N] [--out benchmarks/results]
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --config paper --lengths 1024 4096 8192

``--config paper``: the 36-layer models of the paper's experiments (conf/experiment/trembl_*: d 512,
8 heads of 64, d_ff 1024, m 256). On CUDA the step runs under autocast (``--dtype``), every timed
step is synchronized, and the peak memory of a step is reported.

Floors: CPU (issue 4) at L = 4096, Performer-ReLU >= 1.5x the exact model's tokens/s; CUDA
(issue 11, paper config) Performer-ReLU >= 1.0x at L = 4096 and >= 1.5x at L = 8192.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _record import Floor, day, fmt, latest, record, source, table, write

from protein_performer.data.collate import mask_tokens
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.performer import PerformerConfig, PerformerLM

REPO = Path(__file__).resolve().parents[1]
ATTENTIONS = {
    "exact": "Transformer (exact softmax)",
    "favor_softmax": "Performer-softmax",
    "favor_relu": "Performer-ReLU",
}
SMALL = dict(depth=4, dim=256, heads=4, dim_head=64, ff_dim=512, nb_features=256, dropout=0.1, causal=False)
PAPER = dict(depth=36, dim=512, heads=8, dim_head=64, ff_dim=1024, nb_features=256, dropout=0.1, causal=False)
FLOOR = {"length": 4096, "attention": "favor_relu", "min_speedup": 1.5}
MODEL = dict(SMALL)
GPU_FLOORS = [
    {"length": 4096, "attention": "favor_relu", "min_speedup": 1.0},
    {"length": 8192, "attention": "favor_relu", "min_speedup": 1.5},
]


def protein_stream(path: Path, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` residues of a FASTA(.gz), sequences concatenated (real composition)."""
    tok = Tokenizer(unknown="X")
    out, total, seq = [], 0, []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                if seq:
                    ids = tok.encode("".join(seq))
                    out.append(ids)
                    total += ids.size
                    seq = []
                    if total >= n_tokens:
                        break
            else:
                seq.append(line.strip())
    return np.concatenate(out)[:n_tokens]


def make_batch(stream: np.ndarray, batch: int, length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for _ in range(batch):
        start = int(rng.integers(0, stream.size - length))
        t, y = mask_tokens(stream[start : start + length], rng, 0.15)
        rows.append(t)
        targets.append(y)
    return {
        "tokens": torch.as_tensor(np.stack(rows)),
        "targets": torch.as_tensor(np.stack(targets)),
        "key_padding_mask": torch.zeros(batch, length, dtype=torch.bool),
    }


def train_step(model, optimizer, batch, autocast=None) -> float:
    device = batch["tokens"].device
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])["logits"]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch["targets"].reshape(-1), ignore_index=-100
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    return float(loss)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model and length (after 1 warm-up)")
    ap.add_argument("--fasta", type=Path, default=REPO / "data" / "uniprot_sample.fasta.gz")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: PyTorch's, one per core); on a machine shared with "
        "other jobs 1 avoids threads stalling on each other at every operation",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype (fp32: none)")
    ap.add_argument(
        "--config",
        default="small",
        choices=["small", "paper"],
        help="small: 4 layers, d 256 (CPU default); paper: 36 layers, d 512, d_ff 1024",
    )
    return ap.parse_args(argv)


def time_steps(batch: dict, length: int, args, autocast, sync) -> tuple[dict, dict, dict]:
    """The three models on one batch: one warm-up step each, then ``args.steps`` steps round robin.
    Returns the models, the step times and (CUDA) the peak memory per attention."""
    device, cuda = batch["tokens"].device, batch["tokens"].is_cuda
    models, opts, times, peaks = {}, {}, {a: [] for a in ATTENTIONS}, {}
    for attention in ATTENTIONS:
        torch.manual_seed(args.seed)
        models[attention] = (
            PerformerLM(PerformerConfig(attention=attention, max_len=length, **MODEL)).to(device).train()
        )
        opts[attention] = torch.optim.AdamW(
            models[attention].parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1
        )
        train_step(models[attention], opts[attention], batch, autocast)  # warm-up
    for _ in range(args.steps):
        for attention in ATTENTIONS:  # round robin
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            train_step(models[attention], opts[attention], batch, autocast)
            sync()
            times[attention].append(time.perf_counter() - t0)
            if cuda:
                peaks[attention] = torch.cuda.max_memory_allocated() / 2**20
    return models, times, peaks


def time_kernels(models: dict, batch: dict, args, autocast, sync) -> dict[str, float]:
    """The attention kernels alone, forward + backward on the batch's shape (median of ``args.steps``
    after one warm-up): the share of a step that the choice of attention can change."""
    batch_size, length = batch["tokens"].shape
    g = torch.Generator().manual_seed(args.seed)
    qkv = [
        torch.randn(batch_size, MODEL["heads"], length, MODEL["dim_head"], generator=g)
        .to(batch["tokens"].device, autocast or torch.float32)
        .requires_grad_()
        for _ in range(3)
    ]
    kernel_times = {a: [] for a in ATTENTIONS}
    kernels = {a: models[a].blocks[0].attn.kernel for a in ATTENTIONS}
    for rep in range(args.steps + 1):
        for attention, kernel in kernels.items():
            sync()
            t0 = time.perf_counter()
            kernel(*qkv, key_padding_mask=batch["key_padding_mask"]).float().sum().backward()
            sync()
            if rep:
                kernel_times[attention].append(time.perf_counter() - t0)
    return {a: statistics.median(ts) for a, ts in kernel_times.items()}


def measure_length(stream: np.ndarray, length: int, args, autocast, sync) -> list[dict]:
    """The rows of one length: step time, tokens/s and speed-up per attention, and the kernels' share."""
    batch_size = max(1, args.tokens_per_step // length)
    batch = {k: v.to(args.device) for k, v in make_batch(stream, batch_size, length, args.seed).items()}
    models, times, peaks = time_steps(batch, length, args, autocast, sync)
    tokens = batch_size * length
    exact_tps = tokens / statistics.median(times["exact"])
    rows = []
    for attention, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "length": length,
                "batch": batch_size,
                "attention": attention,
                "model": ATTENTIONS[attention],
                "step_s_median": med,
                "step_s_all": ts,
                "tokens_per_s": tokens / med,
                "speedup_vs_exact": tokens / med / exact_tps,
                "peak_mem_mb": peaks.get(attention),
            }
        )
        print(
            f"L={length:5d} b={batch_size} {ATTENTIONS[attention]:28s} step {med:7.3f} s  "
            f"{tokens / med:9.0f} tok/s  x{tokens / med / exact_tps:.2f}",
            flush=True,
        )
    kernel_s = time_kernels(models, batch, args, autocast, sync)
    for r in rows:
        r["attention_kernel_s_per_layer"] = kernel_s[r["attention"]]
        r["attention_share_of_step"] = MODEL["depth"] * r["attention_kernel_s_per_layer"] / r["step_s_median"]
    return rows


def check(rows: list[dict], floors: list[dict]) -> list[dict]:
    """Each floor with the measured speed-up and whether it passed (floors without a row are left out)."""
    verdicts = []
    for fl in floors:
        row = next((r for r in rows if r["length"] == fl["length"] and r["attention"] == fl["attention"]), None)
        if row is not None:
            verdicts.append(
                dict(fl, value=row["speedup_vs_exact"], passed=row["speedup_vs_exact"] >= fl["min_speedup"])
            )
    return verdicts


def main(argv=None) -> int:
    """Measure, write ``<out>/train_throughput[_cuda_<dtype>_<config>].{json,md}``; exit 1 when a floor is missed."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch.cuda.is_available() is False (no GPU, or a CPU-only torch)", file=sys.stderr
        )
        return 2
    MODEL.clear()
    MODEL.update(PAPER if args.config == "paper" else SMALL)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    stream = protein_stream(args.fasta, max(args.lengths) * 8)
    rows = [row for length in args.lengths for row in measure_length(stream, length, args, autocast, sync)]
    load_after = os.getloadavg()
    verdicts = check(rows, GPU_FLOORS if cuda and args.config == "paper" else [FLOOR])
    passed = None if not verdicts else all(v["passed"] for v in verdicts)
    fields = {
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "model": MODEL,
        "objective": "bid",
        "tokens_per_step": args.tokens_per_step,
        "timed_steps": args.steps,
        "data": str(args.fasta.relative_to(REPO)) if REPO in args.fasta.parents else str(args.fasta),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": args.dtype,
        "config": args.config,
        "rows": rows,
        "floors": verdicts,
        "floor_passed": passed,
    }
    stem = "train_throughput" if not cuda else f"train_throughput_{args.device}_{args.dtype}_{args.config}"
    rec = record("train_throughput", fields, device=args.device)
    write(args.out / f"{stem}.json", rec)
    text = section(dict(rec, _path=f"{stem}.json"))
    (args.out / f"{stem}.md").write_text(text + "\n")
    print(text)
    for v in verdicts:
        print(
            f"floor: L={v['length']} Performer-ReLU / exact tokens/s {v['value']:.2f} (>= {v['min_speedup']}): "
            + ("PASS" if v["passed"] else "FAIL")
        )
    return 0 if passed in (None, True) else 1


# ------------------------------------------------------------------------------------------ RESULTS.md
HEADING = (
    "## Training throughput (issues 4, 11): `benchmarks/train_throughput.py`\n\n"
    "A step = forward + loss + backward + clip + AdamW on real protein crops (BID); median of the timed "
    "steps after one warm-up; tokens/s ratio against the exact Transformer in the same run."
)
GPU_COMMAND = "bash benchmarks/gpu.sh"


def key(rec: dict) -> tuple:
    """A configuration: device, autocast dtype, model size, torch threads."""
    return rec.get("device", "cpu"), rec.get("dtype", "fp32"), rec.get("config", "small"), rec["threads"]


def section(rec: dict) -> str:
    """One configuration: heading, command, machine, date, load and the table of steps per length and model."""
    model = rec["model"]
    lines = [
        f"### {rec.get('device', 'cpu')}, {rec['threads']} torch threads, {model['depth']} layers, d {model['dim']}",
        "",
        f"Command: `{rec['command']}`  ",
        f"Machine: {rec['machine']}; {day(rec['date'])}; load average {rec['load_average_before'][0]:.2f} before. "
        f"Data: {source(rec)}",
        "",
    ]
    body = [
        [
            r["length"],
            r["batch"],
            r["model"],
            f"{r['step_s_median']:.3f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['speedup_vs_exact']:.2f}x",
            fmt(r.get("attention_kernel_s_per_layer")),
            f"{100 * r['attention_share_of_step']:.0f}%" if "attention_share_of_step" in r else "-",
        ]
        for r in rec["rows"]
    ]
    header = ["L", "batch", "model", "step s", "tokens/s", "vs exact", "attention s/layer", "attention share"]
    return "\n".join(lines + table(header, body))


def _relu_speedup(rec: dict | None, length: int) -> float | None:
    rows = (rec or {}).get("rows", [])
    return next((r["speedup_vs_exact"] for r in rows if r["attention"] == "favor_relu" and r["length"] == length), None)


def floors(records: list[dict]) -> list[Floor]:
    """Issue 4 per latest CPU configuration (L=4096 Performer-ReLU / exact), issue 11 on the GPU (paper config)."""
    shown = latest(records, key)
    out = [
        Floor(
            "4",
            f"L=4096 Performer-ReLU / exact tokens/s ({rec['threads']} torch threads)",
            1.5,
            False,
            _relu_speedup(rec, 4096),
            rec,
        )
        for rec in sorted(shown, key=key)
        if rec.get("device", "cpu") == "cpu"
    ]
    gpu = next((r for r in shown if r.get("device", "cpu") != "cpu" and r.get("config") == "paper"), None)
    for length, limit in ((4096, 1.0), (8192, 1.5)):
        what = f"H200 36 layers bf16 L={length} Performer-ReLU / exact tokens/s"
        out.append(Floor("11", what, limit, False, _relu_speedup(gpu, length), gpu, GPU_COMMAND))
    return out


if __name__ == "__main__":
    sys.exit(main())
