"""The memory-lean scan path (favor/scan.py) against the batched autograd path (favor/causal.py):
same outputs and gradients (float64, to rounding), blocks that split chunks and sequences,
padding, and what is saved for backward (no L x m feature tensor)."""

from __future__ import annotations

import itertools

import pytest
import torch

from protein_performer.model.favor import FavorAttention, scan
from protein_performer.model.favor.module import CPU_SCAN_MIN_LENGTH, CPU_SCAN_MIN_ROWS


def qkv(b=2, h=3, length=37, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3))
    k[:, :, length // 2] *= 6  # the causal stabilizer jumps in the middle of the sequence
    return q, k, v


def run(fa, q, k, v, mask=None, grad_seed=3):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = fa(q, k, v, mask)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize(
    "kernel,causal,masked,block",
    itertools.product(["softmax", "softmax_hyp", "relu"], [True, False], [False, True], [None, 2]),
)
def test_scan_equals_batched_path(monkeypatch, kernel, causal, masked, block):
    """Forward and the gradients of q, k, v agree to float64 rounding. block=2: blocks of two chunks
    (C = 8, L = 37: five blocks, the last one short and padded); None: one block."""
    b, h, d, m, C = 2, 3, 16, 32, 8
    if block is not None:
        monkeypatch.setattr(scan, "BLOCK_ELEMENTS", b * h * m * C * block)
    q, k, v = qkv()
    mask = None
    if masked:
        mask = torch.zeros(2, 37, dtype=torch.bool)
        mask[1, -9:] = True  # right padding
        mask[0, :3] = True  # left padding: the first queries see no real key
    ref = run(
        FavorAttention(d, m, kernel=kernel, causal=causal, chunk_size=C, seed=1, impl="batched").double(), q, k, v, mask
    )
    got = run(
        FavorAttention(d, m, kernel=kernel, causal=causal, chunk_size=C, seed=1, impl="scan").double(), q, k, v, mask
    )
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=name)


def test_scan_gradcheck_causal_across_blocks(monkeypatch):
    monkeypatch.setattr(scan, "BLOCK_ELEMENTS", 1 * 1 * 8 * 4 * 2)
    fa = FavorAttention(4, 8, causal=True, chunk_size=4, seed=2, impl="scan").double()
    q, k, v = (x.requires_grad_() for x in qkv(1, 1, 11, 4, seed=5))
    assert torch.autograd.gradcheck(lambda *t: fa(*t), (q, k, v))


def saved_bytes(fa, q, k, v) -> tuple[int, int]:
    """Bytes of all tensors autograd saves during forward, and the largest one."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fa(q, k, v)
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("causal", [True, False])
def test_scan_saves_no_feature_map(causal):
    """Saved for backward: q, k, [v 1], the output, the denominator and (causal) one m x e state per
    block, far below the batched path's q' and k' (two L x m float32 maps). L = 2048, m = 256, d = 16."""
    b, h, length, d, m = 1, 2, 2048, 16, 256
    q, k, v = (x.float().requires_grad_() for x in qkv(b, h, length, d))
    total, largest = saved_bytes(FavorAttention(d, m, causal=causal, impl="scan"), q, k, v)
    feature_map = b * h * length * m * 4
    rows = scan._block_rows(b * h, m, 64, length)
    states = (length // rows) * b * h * m * (d + 1) * 4 if causal else b * h * m * (d + 1) * 4
    inputs = 4 * b * h * length * (d + 1) * 4 + b * h * length * 4  # xq, xk, [v 1], out (+1 col slack), den
    assert largest < feature_map / 4
    assert total <= inputs + states + 4096
    batched, _ = saved_bytes(FavorAttention(d, m, causal=causal, impl="batched"), q, k, v)
    assert batched >= 2 * feature_map > 2 * total


@pytest.mark.parametrize("causal", [True, False])
def test_scan_bf16_autocast_keeps_fp32_features(causal):
    """Under bf16 autocast the output is bf16 (v's dtype) and equals the float32 computation on the
    same bf16-rounded inputs (features and sums stay float32), to float32 rounding."""
    q, k, v = (x.to(torch.bfloat16) for x in qkv(1, 2, 40, 16, dtype=torch.float32))
    fa = FavorAttention(16, 32, causal=causal, chunk_size=8, seed=1, impl="scan")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fa(q, k, v)
    ref = fa(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_impl_choice():
    x = torch.zeros(1, 1, 4, 8)
    assert FavorAttention(8, 16).resolve_impl(x) == "batched"
    assert FavorAttention(8, 16, impl="scan").resolve_impl(x) == "scan"
    assert FavorAttention(8, 16, kernel="softmax_trig").resolve_impl(x) == "batched"
    with pytest.raises(ValueError, match="impl must be one of"):
        FavorAttention(8, 16, impl="cuda")
    with pytest.raises(ValueError, match="causal only"):
        FavorAttention(8, 16, impl="fla")


def test_auto_uses_the_scan_on_long_cpu_inputs(monkeypatch):
    """On the CPU ``auto`` is batched below CPU_SCAN_MIN_LENGTH positions or CPU_SCAN_MIN_ROWS rows
    (fewer, larger ops win on short inputs) and the scan from there on (measured in module.py);
    both give the same numbers."""
    from protein_performer import runtime

    monkeypatch.setattr(runtime, "_done", False)  # another test of this process may have tuned malloc
    n, heads = CPU_SCAN_MIN_LENGTH, CPU_SCAN_MIN_ROWS // CPU_SCAN_MIN_LENGTH
    for causal in (False, True):
        fa = FavorAttention(8, 16, causal=causal, seed=3)
        assert fa.resolve_impl(torch.zeros(1, heads, n - 1, 8)) == "batched"
        assert fa.resolve_impl(torch.zeros(1, heads - 1, n, 8)) == "batched"
        assert fa.resolve_impl(torch.zeros(1, heads, n, 8)) == "scan"
        assert FavorAttention(8, 16, kernel="softmax_trig").resolve_impl(torch.zeros(1, heads, n, 8)) == "batched"
        q, k, v = (
            torch.randn(1, heads, n, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
            for i in range(3)
        )
        batched = FavorAttention(8, 16, causal=causal, seed=3, impl="batched").double()
        # float64 on both paths: the two summation orders agree to ~1e-15 relative
        torch.testing.assert_close(fa.double()(q, k, v), batched(q, k, v), rtol=1e-12, atol=1e-12)


def test_auto_keeps_causal_batched_after_malloc_tuning(monkeypatch):
    """With ``keep_freed_memory()`` applied the batched path has no page-fault churn and is the
    faster causal CPU path (module.py); bidirectional attention stays on the scan."""
    from protein_performer import runtime

    x = torch.zeros(1, CPU_SCAN_MIN_ROWS // CPU_SCAN_MIN_LENGTH, CPU_SCAN_MIN_LENGTH, 8)
    monkeypatch.setattr(runtime, "_done", True)
    assert FavorAttention(8, 16, causal=True).resolve_impl(x) == "batched"
    assert FavorAttention(8, 16, causal=False).resolve_impl(x) == "scan"
    monkeypatch.setattr(runtime, "_done", False)
    assert FavorAttention(8, 16, causal=True).resolve_impl(x) == "scan"
