"""What the FAVOR+ probe (protein_performer/model/favor/probe.py) decides on this device (gpu.sh).

For the benchmark's configurations (d 64, m 256, chunk 64; softmax and relu, causal and
bidirectional; triton, and fla for causal) it runs ``probe.check_fast_path`` in float32 alone and
then with the given dtype too, and prints the largest error relative to its bound (<= 1:
``FavorAttention`` uses the fast path; > 1: it warns and uses the batched path) and where it
occurred. Exit 1 when a fast path is rejected or cannot run: the timing rows of that path then
measure the batched path.

    python benchmarks/probe_check.py cuda --dtype bf16
    TRITON_INTERPRET=1 python benchmarks/probe_check.py cpu --small   # the CPU, Triton's interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def report(fa, impl: str, device: str, dtype: torch.dtype, name: str) -> bool:
    """Print the probe's finding in float32 alone, then with ``dtype`` too; True when rejected."""
    from triton.errors import TritonError

    from protein_performer.model.favor import probe

    for run_dtype in dict.fromkeys([torch.float32, dtype]):
        label = f"{name} {str(run_dtype).removeprefix('torch.')}"
        try:
            finding = probe.check_fast_path(fa, impl, device, run_dtype)
        except TritonError as exc:
            print(f"{label}: cannot run ({type(exc).__name__}: {str(exc).splitlines()[0]})", flush=True)
            return True
        verdict = "ok" if finding.ratio <= 1 else "REJECTED: FavorAttention runs the batched path instead"
        print(f"{label}: error / bound {finding.ratio:.2f}, {finding}; {verdict}", flush=True)
        if finding.ratio > 1:
            return True
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--small", action="store_true", help="d 16, m 16, chunk 16 (for the interpreter)")
    args = parser.parse_args(argv)
    from protein_performer.model.favor import FavorAttention
    from protein_performer.model.favor.fla_backend import fla_available, interpreter_workarounds

    d, m, chunk = (16, 16, 16) if args.small else (64, 256, 64)
    impls = ["triton"] + (["fla"] if fla_available() else [])
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and "fla" in impls
    bad = 0
    with interpreter_workarounds() if interpreted else contextlib.nullcontext():
        for impl in impls:
            for kernel in ("softmax", "relu"):
                for causal in (True, False) if impl == "triton" else (True,):
                    fa = FavorAttention(d, m, kernel=kernel, causal=causal, chunk_size=chunk, impl="batched")
                    fa = fa.to(args.device)
                    name = f"{impl:6s} {kernel:7s} {'causal' if causal else 'bidir':6s} d {d} m {m}"
                    bad += report(fa, impl, args.device, DTYPES[args.dtype], name)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
