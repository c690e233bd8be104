"""Attention benchmark: forward+backward time and peak memory, FAVOR+ vs exact SDPA (issue 3).

Methods, all measured in the same run: exact softmax attention through
``F.scaled_dot_product_attention`` (``SoftmaxAttention``), our FAVOR+ softmax and FAVOR+ ReLU
(``FavorAttention``), and performer-pytorch's ``FastAttention`` when it is installed (the
``bench`` extra). Batch 1, 8 heads, d 64, m 256, causal and bidirectional. Variants time one
implementation each (``VARIANTS``), among them fla-core's kernels on our features
(``favor/fla_backend.py``; causal only: fla has no bidirectional op).

One measurement = forward, then backward of a fixed random output gradient, w.r.t. q, k and v.
Each (method, mode, length) runs in its own subprocess, so that peak memory is its own:
- CPU: peak resident memory (``VmHWM``) minus the resident memory just before the first
  forward+backward (inputs already allocated). glibc's malloc is told to mmap every allocation of
  64 KiB or more (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and
  the high-water mark is that of live tensors (plus a few MiB of runtime state).
- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
Time: measured in the main process, all methods of one (mode, length) round-robin so that they
share the machine's load: one warm-up each, then ``--reps`` rounds; the table reports the minimum
(the least-disturbed run on a shared machine; the JSON also has the median). A run whose warm-up
takes more than 10 s is timed once. CUDA runs are synchronized. A method whose time, projected
from the previous length (x4 for quadratic, x2 for linear methods), exceeds ``--time-cap``
seconds is skipped.

    python benchmarks/attention.py                                  # CPU, fp32, 2 threads, plain process
    python benchmarks/attention.py --keep-freed-memory              # the same after malloc tuning
    python benchmarks/attention.py --device cuda --dtype bf16 --lengths 1024 4096 16384 65536
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _record import record, write
from attention_section import section

METHODS = ("exact_sdpa", "favor_softmax", "favor_relu", "performer_pytorch")
# FAVOR+ softmax through one implementation (FavorAttention(impl=...)); "compile" is torch.compile
# over the batched path; "triton" is favor/triton_kernels.py (CUDA, or CPU under TRITON_INTERPRET=1).
# On CUDA, "favor_softmax" and "favor_relu" (impl auto) are the triton path when triton imports.
# "fla": our features, the causal product on fla-core's gated chunk kernels (fla_backend.favor_causal_fla:
# our semantics exactly); "fla_normalized": fla's chunk_linear_attn(normalize=True) on key features
# with one stabilizer per sequence (the JAX semantics, for comparison). Causal only.
VARIANTS = (
    "favor_softmax_scan",
    "favor_softmax_batched",
    "favor_softmax_compile",
    "favor_relu_compile",
    "favor_softmax_fla",
    "favor_softmax_fla_normalized",
    "favor_relu_fla",
    "favor_softmax_triton",
    "favor_relu_batched",
    "favor_relu_triton",
)
FLA_VARIANTS = ("fla", "fla_normalized")
QUADRATIC = {"exact_sdpa"}
RESULTS = Path(__file__).resolve().parent / "results"


def build(method: str, causal: bool, dim_head: int, nb_features: int, chunk_size: int):
    """The attention module and a call (q, k, v) -> out for one method."""
    if method == "exact_sdpa":
        from protein_performer.model.attention import SoftmaxAttention

        module = SoftmaxAttention(causal=causal)
    elif method.startswith("favor_"):
        from protein_performer.model.favor import FavorAttention

        kernel = "relu" if method.startswith("favor_relu") else "softmax"
        variant = method.split("_", 2)[2] if method.count("_") >= 2 else "auto"
        impl = "batched" if variant in ("compile",) + FLA_VARIANTS else variant
        module = FavorAttention(
            dim_head, nb_features, kernel=kernel, causal=causal, chunk_size=chunk_size, seed=0, impl=impl
        )
        if variant == "compile":
            import torch

            module = torch.compile(module)
        elif variant in FLA_VARIANTS:
            if not causal:
                raise ValueError("fla's linear-attention kernels are causal only")
            module = FlaFavor(module, normalized=variant == "fla_normalized")
    elif method == "performer_pytorch":
        from performer_pytorch import FastAttention

        module = FastAttention(dim_heads=dim_head, nb_features=nb_features, causal=causal)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return module


class FlaFavor:
    """FavorAttention's features (float32 also under autocast) + the causal product on fla-core's kernels.

    ``normalized=False``: ``fla_backend.favor_causal_fla``, our semantics (per-key scales, running-max
    stabilizer as fla's gate, the eps floor outside). ``normalized=True``: ``chunk_linear_attn(...,
    normalize=True)`` on key features with one stabilizer per (batch, head) and eps inside them (the
    released JAX semantics; see fla_backend's docstring): a timing comparison, not a replacement.
    """

    def __init__(self, favor, normalized: bool = False):
        import os

        from protein_performer.model.favor import fla_backend

        if os.environ.get("TRITON_INTERPRET") == "1":  # CPU dry run: fla needs two interpreter workarounds
            from fla_check import interpreter_workarounds

            interpreter_workarounds()
        self.favor, self.backend, self.normalized = favor, fla_backend, normalized

    def to(self, device):
        self.favor.to(device)
        return self

    def __call__(self, q, k, v):
        import torch

        fa = self.favor
        with torch.autocast(q.device.type, enabled=False):
            q_prime = fa.features(q, True)
            if self.normalized:
                out = self.backend.favor_causal_fla_normalized(q_prime, fa.features(k, False), v)
            elif fa.kind == "relu":  # no stabilizer: eps is inside the features
                out = self.backend.favor_causal_fla(q_prime, fa.features(k, False), v)
            else:
                k_hat, key_scale = fa.causal_key_features(k)
                out = self.backend.favor_causal_fla(q_prime, k_hat, v, key_scale, fa.feature_floor())
        return out.to(v.dtype)


def rss_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, from /proc.
    VmHWM belongs to the process image, so unlike ru_maxrss it is not inherited across exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


class Case:
    """One (method, mode, length): the module, fixed random q, k, v and output gradient."""

    def __init__(self, cfg: dict):
        import torch

        self.torch = torch
        self.device = torch.device(cfg["device"])
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
        self.module = build(cfg["method"], cfg["causal"], cfg["dim_head"], cfg["nb_features"], cfg["chunk_size"]).to(
            self.device
        )
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (cfg["batch"], cfg["heads"], cfg["length"], cfg["dim_head"])
        self.q, self.k, self.v, self.grad = (torch.randn(shape, generator=gen).to(self.device, dtype) for _ in range(4))
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)
        self.cuda = self.device.type == "cuda"

    def run(self) -> float:
        """One forward + backward, in seconds."""
        for t in (self.q, self.k, self.v):
            t.grad = None
        if self.cuda:
            self.torch.cuda.synchronize()
        start = time.perf_counter()
        self.module(self.q, self.k, self.v).backward(self.grad)
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - start


def worker(cfg: dict) -> dict:
    """In a fresh process: peak memory of the first forward+backward, and its time."""
    import torch

    torch.set_num_threads(cfg["threads"])
    case = Case(cfg)
    if case.cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        first = case.run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes("VmRSS")
        first = case.run()
        peak = rss_bytes("VmHWM") - base
    return {"first_time_s": first, "peak_mem_mb": peak / 2**20}


def interleaved_times(cfgs: list[dict], reps: int) -> list[dict]:
    """Times of the given cases measured round-robin in this process (so that all methods of one
    length see the same load): one warm-up each, then ``reps`` rounds; the minimum is reported
    (the least-disturbed run on a shared machine), the median too. Cases whose warm-up takes over
    10 s are timed once."""
    import torch

    torch.set_num_threads(cfgs[0]["threads"])
    cases = [Case(cfg) for cfg in cfgs]
    times = [[case.run()] for case in cases]  # warm-up
    for _ in range(reps):
        for case, ts in zip(cases, times):
            if ts[0] < 10.0:
                ts.append(case.run())
    out = []
    base = next((ts for cfg, ts in zip(cfgs, times) if cfg["method"] == "exact_sdpa"), None)
    for ts in times:
        runs = ts[1:] if len(ts) > 1 else ts
        row = {"time_s": min(runs), "median_time_s": statistics.median(runs), "runs": len(runs)}
        if base is not None and len(base) == len(ts) and len(ts) > 1:  # same rounds: paired ratios
            row["median_ratio"] = statistics.median(a / b for a, b in zip(ts[1:], base[1:]))
        out.append(row)
    del cases
    return out


def measure(cfg: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def performer_pytorch_available() -> bool:
    try:
        import performer_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def check_floors(rows: list[dict], scaling: list[dict]) -> list[dict]:
    """The floors of issues 3 and 11 (CPU, fp32); each is PASS, FAIL or n/a (a number is missing)."""

    def paired(method, mode, length):
        for r in rows:
            if r["method"] == method and r["mode"] == mode and r["length"] == length and "median_ratio" in r:
                return r["median_ratio"]
        return None

    def t(method, mode, length, key="time_s"):
        for r in rows:
            if r["method"] == method and r["mode"] == mode and r["length"] == length and key in r:
                return r[key]
        return None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    def scale(mode):
        return next((x["ratio"] for x in scaling if x["mode"] == mode and x["lengths"] == [8192, 16384]), None)

    floors = [
        (
            "L=8192 causal: favor_softmax / exact_sdpa time (median of paired rounds)",
            paired("favor_softmax", "causal", 8192),
            0.3,
        ),
        (
            "L=8192 bidirectional: favor_softmax / exact_sdpa time (median of paired rounds)",
            paired("favor_softmax", "bidirectional", 8192),
            0.15,
        ),
        (
            "L=4096 causal: favor_softmax / performer_pytorch time",
            ratio(t("favor_softmax", "causal", 4096), t("performer_pytorch", "causal", 4096)),
            0.1,
        ),
        ("causal favor_softmax: time(16384) / time(8192), timed round-robin", scale("causal"), 2.3),
        ("bidirectional favor_softmax: time(16384) / time(8192), timed round-robin", scale("bidirectional"), 2.3),
        (
            "L=16384 favor_softmax: causal / bidirectional peak memory",
            ratio(
                t("favor_softmax", "causal", 16384, "peak_mem_mb"),
                t("favor_softmax", "bidirectional", 16384, "peak_mem_mb"),
            ),
            2.0,
        ),
    ]
    return [
        {
            "floor": name,
            "value": value,
            "limit": limit,
            "verdict": "n/a" if value is None else ("PASS" if value <= limit else "FAIL"),
        }
        for name, value, limit in floors
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--modes", nargs="+", default=["causal", "bidirectional"], choices=["causal", "bidirectional"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS + VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--nb-features", type=int, default=256)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="causal chunk C of FAVOR+ (default: the implementation's)"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--time-cap", type=float, default=45.0, help="skip a run projected to take longer (s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="time after protein_performer.runtime.keep_freed_memory() (malloc tuning, as the train and "
        "export entry points apply it); default: a plain process, as a library user has",
    )
    parser.add_argument(
        "--system-malloc", action="store_true", help="the default now (a plain process); kept for old commands"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def base_config(args: argparse.Namespace, method: str = "favor_softmax") -> dict:
    """A worker's configuration without the mode and length."""
    return {
        "method": method,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "batch": args.batch,
        "heads": args.heads,
        "dim_head": args.dim_head,
        "nb_features": args.nb_features,
        "chunk_size": args.chunk_size,
    }


def measure_mode(args: argparse.Namespace, mode: str) -> list[dict]:
    """The rows of one mode: per length, each method's peak memory in its own worker, then the methods
    timed round-robin; a method projected past ``--time-cap`` (or that failed) is skipped at longer lengths."""
    rows: list[dict] = []
    last = {method: None for method in args.methods}  # (time, length) of the previous length
    for length in sorted(args.lengths):
        measured = []
        for method in args.methods:
            row = {"method": method, "mode": mode, "length": length}
            rows.append(row)
            if mode == "bidirectional" and method.split("_", 2)[-1] in FLA_VARIANTS:
                row["skipped"] = "n/a (causal only)"
                continue
            if last[method] is not None:
                previous, previous_length = last[method]
                projected = previous * (length / previous_length) ** (2 if method in QUADRATIC else 1)
                if projected > args.time_cap:
                    row["skipped"] = f"skipped (> {args.time_cap:.0f} s)"
                    last[method] = (float("inf"), length)
                    continue
            cfg = dict(base_config(args, method), causal=mode == "causal", length=length)
            row.update(measure(cfg))
            if "error" in row:
                last[method] = (float("inf"), length)
            else:
                measured.append((row, cfg))
        if measured:
            for (row, _), timing in zip(measured, interleaved_times([cfg for _, cfg in measured], args.reps)):
                row.update(timing)
                last[row["method"]] = (row["time_s"], length)
        for row in rows[-len(args.methods) :]:
            status = row.get("skipped") or row.get("error") or f"{row['time_s']:8.3f} s  {row['peak_mem_mb']:8.1f} MiB"
            print(f"{mode:13s} {row['method']:28s} L={length:6d}  {status}", flush=True)
    return rows


def measure_scaling(args: argparse.Namespace) -> list[dict]:
    """Linear scaling: the two largest lengths timed round-robin in one process, so that the ratio
    is not a comparison of two different moments of a shared machine's load."""
    scaling = []
    if "favor_softmax" in args.methods and len(args.lengths) >= 2:
        small, large = sorted(args.lengths)[-2:]
        for mode in args.modes:
            cfgs = [dict(base_config(args), causal=mode == "causal", length=n) for n in (small, large)]
            t_small, t_large = interleaved_times(cfgs, args.reps)
            scaling.append(
                {
                    "mode": mode,
                    "lengths": [small, large],
                    "times_s": [t_small["time_s"], t_large["time_s"]],
                    "ratio": t_large["time_s"] / t_small["time_s"],
                }
            )
            print(
                f"scaling {mode:13s} favor_softmax  time({large}) / time({small}) = {scaling[-1]['ratio']:.2f}",
                flush=True,
            )
    return scaling


def main(argv: list[str] | None = None) -> int:
    """Measure, write the ``attention`` record to ``--out`` and print its section and floors."""
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    if args.keep_freed_memory:  # timing process only; memory workers keep their own malloc settings
        from protein_performer.runtime import keep_freed_memory

        keep_freed_memory()

    if "performer_pytorch" in args.methods and not performer_pytorch_available():
        print("performer-pytorch is not installed (pip install -e '.[bench]'): skipping it")
        args.methods = [m for m in args.methods if m != "performer_pytorch"]

    rows = [row for mode in args.modes for row in measure_mode(args, mode)]
    scaling = measure_scaling(args)
    floors = check_floors(rows, scaling)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    if args.device == "cuda":
        import torch

        config["gpu"] = torch.cuda.get_device_name(0)
    rec = record("attention", {"config": config, "rows": rows, "scaling": scaling, "floors": floors}, args.device)
    write(args.out, rec)
    print()
    print(section(dict(rec, _path=args.out.name)))
    if args.device == "cpu" and args.dtype == "fp32":
        print()
        for f in floors:
            print(f"{f['verdict']:4s}  {f['floor']}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
