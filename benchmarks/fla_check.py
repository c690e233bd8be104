"""Check fla-core's kernels on this device against the float64 PyTorch path before timing them (gpu.sh).

Causal FAVOR+ softmax (exact running-max stabilizer: ``fla_backend.favor_causal_fla``) and
Performer-ReLU, forward and the gradients of q, k, v, 2 x 4 x L x 64, m 256, with padding. fla's
``tl.dot`` calls use Triton's default float32 precision: TF32 on NVIDIA GPUs (unit roundoff
2^-11), full float32 with ``TRITON_F32_DEFAULT=ieee``; the limit follows (1e-2 and 1e-4 of the
largest entry). Exit 1 when one disagrees.

    python benchmarks/fla_check.py cuda 1000
    TRITON_INTERPRET=1 python benchmarks/fla_check.py cpu 70   # CPU, Triton's interpreter

``interpreter_workarounds`` is what fla-core 0.6.0 with triton 3.9 needs in interpreter mode (the
same two workarounds as tests/model/test_favor_fla.py; compiled kernels need neither).
"""

from __future__ import annotations

import os
import sys


class _LoopIndex(int):
    """A ``range`` loop index with the no-op ``.to`` that compiled Triton gives it."""

    def to(self, *args, **kwargs):
        return self


def _loop_range(*args):
    return map(_LoopIndex, range(*args))


def interpreter_workarounds() -> None:
    """Under TRITON_INTERPRET=1 only: keep the first autotune config (benchmarking configs needs a GPU
    driver) and give the ``range`` loop indices of fla's kernels a no-op ``.to``. For this process."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import fla.ops.linear_attn  # noqa: F401  (import every kernel module before patching)
    import fla.ops.simple_gla  # noqa: F401
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
    for name, mod in list(sys.modules.items()):
        if name.startswith("fla.") and mod is not None:
            mod.range = _loop_range


def run(fa, q, k, v, mask, go, fla: bool):
    from protein_performer.model.favor.causal import causal_linear_attention
    from protein_performer.model.favor.fla_backend import favor_causal_fla

    x = [t.detach().requires_grad_() for t in (q, k, v)]
    q_prime = fa.features(x[0], True)
    if fa.kind == "relu":
        k_prime, key_scale, floor = fa.features(x[1], False, mask), None, 0.0
    else:
        (k_prime, key_scale), floor = fa.causal_key_features(x[1], mask), fa.feature_floor()
    if fla:
        out = favor_causal_fla(q_prime, k_prime, x[2], key_scale, floor, mask)
    else:
        out = causal_linear_attention(q_prime, k_prime, x[2].to(q_prime.dtype), 128, key_scale, floor, mask)
    out.backward(go.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in x]


def main(device: str, length: int) -> int:
    import torch

    from protein_performer.model.favor import FavorAttention

    interpreter_workarounds()
    ieee = os.environ.get("TRITON_F32_DEFAULT") == "ieee" or device == "cpu"
    limit = 1e-4 if ieee else 1e-2
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(2, 4, length, 64, generator=g, dtype=torch.float64).to(device) for _ in range(4))
    mask = torch.zeros(2, length, dtype=torch.bool, device=device)
    mask[1, -length // 10 :] = True
    bad = 0
    for kernel in ("softmax", "relu"):
        fa = FavorAttention(64, 256, kernel=kernel, causal=True, seed=1, impl="batched").to(device)
        ref = run(fa.double(), q, k, v, mask, go, fla=False)
        got = run(fa.float(), *(t.float() for t in (q, k, v)), mask, go, fla=True)
        errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]
        ok = max(errs) < limit
        bad += not ok
        print(
            f"fla {kernel:8s} causal max rel err out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs),
            f"(limit {limit:.0e}, {'ieee' if ieee else 'tf32'} dots)",
            "ok" if ok else "FAIL",
            flush=True,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
