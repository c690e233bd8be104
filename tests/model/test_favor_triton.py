"""The Triton FAVOR+ kernels (favor/triton_kernels.py) on the CPU under Triton's interpreter, against
the PyTorch paths: forward and the gradients of q, k, v, causal and bidirectional, with padding,
lengths that are not a multiple of the chunk, d and m that are not powers of two.

TRITON_INTERPRET=1 is set before triton is imported (here, and for the whole session in conftest.py,
before Lightning imports triton: the kernels and triton.language are built in interpreter mode when
they are decorated, at import) and stays set for this process. Skipped when triton is absent.

Tolerances. float32: the reference is the batched path in float64 (exact to ~1e-16 here). Every
output and gradient is a sum of at most L m (< 10^4) positive or signed terms of features
exp(logit - max) (or relu(logit) + eps) whose logits are O(10): they carry a relative error of about |logit| u
(u = 2^-24 the unit roundoff) and a blocked sum adds about log2(L m) u, so the error stays below
TOL32 = 64 u of the largest entry (a 2x-3x margin); the batched float32 path is checked against the
same bound, so the bound is not vacuous. float16: the module computes in float32 from the float16
inputs on every path and rounds the result to float16 once, so two paths differ by at most one
float16 rounding step (2^-10 relative, as the float32 results differ by TOL32 and can straddle a
rounding boundary) plus TOL32 for entries near zero.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from protein_performer.model.favor import (  # noqa: E402
    FavorAttention,
    FeatureMap,
    module,
    probe,
    triton_ops,  # noqa: E402
)
from protein_performer.model.favor.triton_ops import favor_triton  # noqa: E402

U32 = 2.0**-24
TOL32 = 64 * U32


def qkv(b=2, h=2, length=75, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3))
    k[:, :, length // 2] *= 6  # the causal stabilizer jumps in the middle of the sequence
    return q, k, v


def padding(b, length):
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[-1, -9:] = True  # right padding
    mask[0, :3] = True  # left padding: the first queries see no real key (output 0)
    return mask


def run(fa, q, k, v, mask=None, dtype=None, grad_seed=3):
    dtype = q.dtype if dtype is None else dtype
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = fa(q, k, v, mask)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    return [x.double() for x in (out.detach(), q.grad, k.grad, v.grad)]


def assert_within(got, ref, tol, what):
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (x - y).abs().max().item()
        bound = tol * y.abs().max().item()
        assert err <= bound, f"{what}: {name} max error {err:.3g} > {bound:.3g}"


CASES = list(itertools.product(["softmax", "softmax_hyp", "relu"], [True, False], [False, True]))


@pytest.mark.parametrize("kernel,causal,masked", CASES)
def test_triton_matches_pytorch_float32(kernel, causal, masked):
    """L = 75 in chunks of 16 (five chunks, the last one short), d = 12, m = 24 (not powers of 2):
    forward and all gradients within TOL32 of the float64 batched path, like the float32 batched path."""
    d, m = 12, 24
    q, k, v = qkv(d=d)
    mask = padding(2, 75) if masked else None
    make = lambda impl: FavorAttention(d, m, kernel=kernel, causal=causal, chunk_size=16, seed=1, impl=impl)  # noqa: E731
    truth = run(make("batched").double(), q, k, v, mask)
    assert_within(run(make("batched"), q, k, v, mask, torch.float32), truth, TOL32, "batched float32")
    got = run(make("triton"), q, k, v, mask, torch.float32)
    assert_within(got, truth, TOL32, "triton float32")
    if masked:  # padded keys: no value gradient; causal queries with no real key yet: output 0
        assert got[3][1, :, -9:].abs().max() == 0
        assert got[3][0, :, :3].abs().max() == 0
        assert (got[0][0, :, :3].abs().max() == 0) == causal


@pytest.mark.parametrize("causal", [True, False])
def test_triton_default_chunk_long_sequence(monkeypatch, causal):
    """L = 200 with the default chunk (64: three full chunks and a short one), m = 32, d = 16, padding;
    bidirectional sums split over two row ranges (PARTS = 2: 128 + 72 rows)."""
    monkeypatch.setattr(triton_ops, "PARTS", 2)
    d, m = 16, 32
    q, k, v = qkv(b=2, h=1, length=200, d=d, seed=4)
    mask = padding(2, 200)
    make = lambda impl: FavorAttention(d, m, causal=causal, seed=2, impl=impl)  # noqa: E731
    truth = run(make("batched").double(), q, k, v, mask)
    assert_within(run(make("triton"), q, k, v, mask, torch.float32), truth, TOL32, "triton float32")


@pytest.mark.parametrize("causal", [True, False])
def test_triton_float16_inputs(causal):
    """float16 q, k, v: output and gradients float16, within one float16 rounding of the batched
    path on the same float16 inputs (both compute in float32)."""
    d, m = 16, 32
    q, k, v = qkv(length=70, d=d, seed=6)
    mask = padding(2, 70)
    make = lambda impl: FavorAttention(d, m, causal=causal, chunk_size=16, seed=3, impl=impl)  # noqa: E731
    ref = run(make("batched"), q, k, v, mask, torch.float16)
    fa = make("triton")
    out = fa(*(x.half() for x in (q, k, v)), mask)
    assert out.dtype == torch.float16
    got = run(fa, q, k, v, mask, torch.float16)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(x, y, rtol=2.0**-10, atol=TOL32 * y.abs().max().item() + 2.0**-24, msg=name)


def test_triton_causal_later_keys_do_not_change_earlier_outputs():
    """The per-position stabilizer: appending keys, one of them huge (its logits ~ 10^2 above the
    rest), leaves the outputs and the gradients of the first 48 positions unchanged."""
    d, m, n = 16, 32, 48
    q, k, v = qkv(b=1, h=2, length=96, d=d, seed=8, dtype=torch.float32)
    k[:, :, 70] *= 30
    fa = FavorAttention(d, m, causal=True, chunk_size=16, seed=4, impl="triton")
    short = fa(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    full = fa(q, k, v)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full[:, :, :n], short, rtol=0, atol=TOL32 * short.abs().max().item())


@pytest.mark.parametrize("causal", [True, False])
def test_favor_triton_direct_call_and_validation(causal):
    """The function itself (scan.favor_scan's signature), values of another width than q and k
    (d_v = 5, d = 16), and its errors."""
    q, k, v = (x.float() * 16**-0.25 for x in qkv(b=1, h=2, length=40, d=16))
    v = v[..., :5]
    features = FeatureMap(16, 32, "softmax", seed=0)
    got = run(lambda *x: favor_triton(*x[:3], features, causal, 16), q, k, v)
    from protein_performer.model.favor.scan import favor_scan

    ref = run(lambda *x: favor_scan(*x[:3], features, causal, 16), q, k, v, dtype=torch.float64)
    assert got[0].shape == (1, 2, 40, 5)
    assert_within(got, ref, TOL32, "direct call")
    with pytest.raises(ValueError, match="fused paths support the kernels"):
        favor_triton(q, k, v, FeatureMap(16, 32, "softmax_trig"), True, 16)


def test_triton_saves_no_feature_map():
    """Saved for backward: xq, xk, [v 1], the output, the denominator, the feature sums A and the
    padding mask: O(L (d + E)) numbers, far below one L x m feature map (m = 256 here)."""
    b, h, length, d, m = 1, 1, 256, 16, 256
    q, k, v = (x.float().requires_grad_() for x in qkv(b, h, length, d))
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FavorAttention(d, m, causal=True, impl="triton")(q, k, v)
    feature_map = b * h * length * m * 4
    assert max(sizes) < feature_map / 8
    assert sum(sizes) < feature_map / 2


def test_impl_dispatch():
    """CPU tensors stay on the PyTorch path under impl="auto" even with triton installed; "triton"
    is explicit and validated."""
    x = torch.zeros(1, 1, 4, 8)
    assert FavorAttention(8, 16).resolve_impl(x) == "batched"
    assert FavorAttention(8, 16, impl="triton").resolve_impl(x) == "triton"
    assert FavorAttention(8, 16, kernel="softmax_hyp", impl="triton").resolve_impl(x) == "triton"
    assert module.triton_available()
    before = dict(probe.RESULTS)
    FavorAttention(8, 16, causal=True)(x, x, x)  # CPU: no probe of the kernels (tests/model/test_favor_probe.py)
    assert FavorAttention(8, 16, kernel="relu", impl="triton").resolve_impl(x) == "triton"
    assert probe.RESULTS == before
    with pytest.raises(ValueError, match="supports the kernels"):
        FavorAttention(8, 16, kernel="softmax_trig", impl="triton")


COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from protein_performer.model.favor import triton_kernels as tk
from protein_performer.model.favor import triton_ops as ops

arch, kernels = int(sys.argv[1]), sys.argv[2].split(",")
ints = {"L", "M", "D", "E", "ROWS", "NP", "N", "X", "NC"}


def signature(fn, consts):
    def kind(name):
        if name in consts:
            return "constexpr"
        if name in ints or name.startswith("s_"):
            return "i32"
        if name in ("ratio", "floor", "feps"):
            return "fp32"
        return "*i8" if name == "PAD" else "*fp32"
    return {name: kind(name) for name in fn.arg_names}


d = dv = 64  # the paper's head size, m = 256 features, chunk 64: the block shapes the launches use
common = dict(BD=64, BV=64, PREC=ops.DOT_PRECISION, RELU=False)
configs = {
    "_forward": (dict(common, BM=ops.BLOCK_M, CH=64, CAUSAL=True), ops.NUM_WARPS),
    "_backward": (dict(common, BM=ops.BLOCK_M_BWD, CH=64, CAUSAL=True), ops.NUM_WARPS),
}
shared = {}
for name in kernels:
    consts, warps = configs[name]
    fn = getattr(tk, name)
    compiled = triton.compile(ASTSource(fn, signature(fn, consts), consts), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    shared[name] = compiled.metadata.shared
print(json.dumps(shared))
"""


@pytest.mark.slow
def test_kernels_compile_for_gpus_within_shared_memory():
    """Compiled (not interpreted) for an H100/H200 (sm_90) with the launch's block shapes at
    d = 64, m = 256, C = 64, without a GPU (triton ships ptxas): the largest kernels compile and
    need at most an A100's 163 KiB of shared memory per block (166912 bytes; sm_90 allows 227 KiB).
    A fresh process: this module's kernels are interpreted."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not list(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*")):
        pytest.skip("this triton build has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE, "90", "_forward,_backward"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(shared) == {"_forward", "_backward"}
    for name, size in shared.items():
        assert 0 < size <= 166912, f"{name} needs {size} bytes of shared memory"
