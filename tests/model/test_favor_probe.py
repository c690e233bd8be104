"""The numerical probe of the fast FAVOR+ paths (favor/probe.py) on the CPU, under Triton's interpreter.

On a GPU ``FavorAttention`` runs the probe before the first CUDA call of a configuration; here the
``cpu_is_cuda`` fixture adds "cpu" to ``probe.FAST_DEVICE_TYPES`` so that the same selection logic
runs on CPU tensors (TRITON_INTERPRET=1, set here and in conftest.py before triton is imported).
The real kernels pass; deliberately broken ones (monkeypatched: a forward off by 1e-4, a wrong key
gradient with the right forward, ignored key padding, a launch error) are rejected with one
warning, after which the module gives the batched path's results. The broken "kernels" wrap the
PyTorch scan (``scan.favor_scan``, favor_triton's signature) or the batched causal product (the
contract of ``fla_backend.favor_causal_fla``), so they cost no interpreter time. The bounds are
``probe.tolerance`` (derivation in favor/probe.py), not restated here.
"""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from triton.errors import TritonError  # noqa: E402

from protein_performer.model.favor import FavorAttention, fla_backend, probe, triton_ops  # noqa: E402
from protein_performer.model.favor.causal import causal_linear_attention  # noqa: E402
from protein_performer.model.favor.scan import favor_scan  # noqa: E402

LOGGER = "protein_performer.model.favor"


@pytest.fixture
def cpu_is_cuda(monkeypatch):
    """Probe CPU tensors as CUDA ones, with an empty verdict cache and no forced implementation."""
    monkeypatch.setattr(probe, "FAST_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(probe, "RESULTS", {})
    monkeypatch.delenv(probe.ENV_IMPL, raising=False)


@pytest.fixture
def fla_interpreter():
    pytest.importorskip("fla.ops.simple_gla")
    with fla_backend.interpreter_workarounds():
        yield


def inputs(length=40, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, length, d, generator=g).to(dtype) for _ in range(3))
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[1, -5:] = True
    return q, k, v, mask


def out_and_grads(fa, q, k, v, mask):
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fa(*x, mask)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [t.grad for t in x]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "kernel, causal, dtype",
    [("softmax", True, torch.float32), ("softmax_hyp", False, torch.bfloat16), ("relu", True, torch.float16)],
)
def test_real_triton_kernels_pass(cpu_is_cuda, monkeypatch, caplog, kernel, causal, dtype):
    """impl="auto" on a probed device: the interpreted kernels pass (float32 and the caller's dtype)
    and are chosen, without a warning."""
    findings = []
    check = probe.check_fast_path
    monkeypatch.setattr(probe, "check_fast_path", lambda *a: findings.append(check(*a)) or findings[-1])
    fa = FavorAttention(16, 16, kernel=kernel, causal=causal, chunk_size=16)
    assert fa.resolve_impl(torch.zeros(1, 1, 4, 16, dtype=dtype)) == "triton"
    assert not warnings_of(caplog)
    assert list(probe.RESULTS.values()) == [True]
    assert 0 < findings[0].ratio <= 1, findings


def test_real_fla_kernels_pass(cpu_is_cuda, fla_interpreter, caplog):
    fa = FavorAttention(16, 16, causal=True, impl="fla")
    assert fa.resolve_impl(torch.zeros(1, 1, 4, 16)) == "fla"
    assert not warnings_of(caplog)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times (1 + 1e-3)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 1e-3)


def scaled_output(xq, xk, v, features, causal, chunk=64, key_padding_mask=None):
    return favor_scan(xq, xk, v, features, causal, chunk, key_padding_mask) * (1 + 1e-4)


def wrong_key_gradient(xq, xk, v, features, causal, chunk=64, key_padding_mask=None):
    return favor_scan(xq, _ScaleGrad.apply(xk), v, features, causal, chunk, key_padding_mask)


def ignores_padding(xq, xk, v, features, causal, chunk=64, key_padding_mask=None):
    return favor_scan(xq, xk, v, features, causal, chunk, None)


@pytest.mark.parametrize(
    "broken, where",
    [
        (scaled_output, r"in (output|dq|dk|dv) at L \d+"),
        (wrong_key_gradient, r"in dk at L \d+"),
        (ignores_padding, r"at L (17|35)"),
    ],
    ids=["output", "key-gradient", "padding"],
)
@pytest.mark.parametrize("causal", [True, False])
def test_broken_triton_kernel_is_rejected(cpu_is_cuda, monkeypatch, caplog, broken, where, causal):
    """One warning naming the largest error, then the batched path's numbers, on every later call."""
    monkeypatch.setattr(triton_ops, "favor_triton", broken)
    fa = FavorAttention(16, 16, causal=causal, chunk_size=16, seed=3)
    q, k, v, mask = inputs()
    got = out_and_grads(fa, q, k, v, mask)
    got_again = out_and_grads(fa, q, k, v, mask)
    (message,) = warnings_of(caplog)
    assert "impl='triton' computes wrong numbers" in message and re.search(where, message), message
    assert "largest error" in message and "bound" in message and probe.ENV_IMPL in message
    assert fa.resolve_impl(q) == "batched"
    ref = out_and_grads(FavorAttention(16, 16, causal=causal, chunk_size=16, seed=3, impl="batched"), q, k, v, mask)
    for a, b, c in zip(got, got_again, ref):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrong", ["output", "key gradient"])
def test_broken_fla_kernel_is_rejected(cpu_is_cuda, monkeypatch, caplog, wrong):
    """impl="fla" (explicit) with a forward off by 1e-4, or the right forward and a key gradient off
    by 1e-3: one warning, then the batched path."""
    pytest.importorskip("fla.ops.simple_gla")

    def broken(q_prime, k_prime, v, key_scale=None, floor=0.0, key_padding_mask=None):
        if wrong == "key gradient":
            k_prime = _ScaleGrad.apply(k_prime)
        v = v.to(q_prime.dtype)
        out = causal_linear_attention(q_prime, k_prime, v, 64, key_scale, floor, key_padding_mask)
        return out * (1 + 1e-4) if wrong == "output" else out

    monkeypatch.setattr(fla_backend, "favor_causal_fla", broken)
    fa = FavorAttention(16, 16, causal=True, seed=2, impl="fla")
    q, k, v, mask = inputs(length=70)
    got = out_and_grads(fa, q, k, v, mask)
    (message,) = warnings_of(caplog)
    assert "impl='fla' computes wrong numbers" in message and "largest error" in message, message
    assert wrong == "output" or "in dk at L" in message, message
    ref = out_and_grads(FavorAttention(16, 16, causal=True, seed=2, impl="batched"), q, k, v, mask)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_launch_error_falls_back(cpu_is_cuda, monkeypatch, caplog):
    def cannot_launch(*args, **kwargs):
        raise TritonError("out of resources: shared memory")

    monkeypatch.setattr(triton_ops, "favor_triton", cannot_launch)
    fa = FavorAttention(16, 16, causal=True)
    q, k, v, mask = inputs(length=20)
    fa(q, k, v, mask)
    fa(q, k, v, mask)
    (message,) = warnings_of(caplog)
    assert "cannot run" in message and "out of resources" in message, message
    assert fa.resolve_impl(q) == "batched"


def test_probe_runs_once_per_key(cpu_is_cuda, monkeypatch):
    """The verdict is cached by (impl, device, dtype, d, m, kernel, causal, chunk, eps); the first
    call may come under no_grad / inference_mode (a validation step): the probe still differentiates."""
    monkeypatch.setattr(triton_ops, "favor_triton", favor_scan)  # a correct "kernel", fast
    calls = []
    check = probe.check_fast_path
    monkeypatch.setattr(probe, "check_fast_path", lambda *a, **kw: calls.append(a[1:]) or check(*a, **kw))
    q, k, v, mask = inputs(length=20)
    fa = FavorAttention(16, 16, causal=True, chunk_size=16)
    with torch.inference_mode():
        fa(q, k, v, mask)
    fa(q, k, v, mask)
    FavorAttention(16, 16, causal=True, chunk_size=16, seed=5)(q, k, v, mask)  # same key: another W
    assert len(calls) == 1
    fa(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # another dtype
    FavorAttention(16, 16, causal=True, chunk_size=32)(q, k, v, mask)  # another chunk
    FavorAttention(16, 16, causal=False, chunk_size=16)(q, k, v, mask)
    assert len(calls) == 4
    assert all(probe.RESULTS.values()) and len(probe.RESULTS) == 4
    key = ("triton", "cpu", torch.float32, 16, 16, "softmax", True, 16, fa.eps)
    assert probe.RESULTS[key]


def test_environment_forces_a_path(cpu_is_cuda, monkeypatch, caplog):
    """PROTEIN_PERFORMER_FAVOR_IMPL: batched never uses a fast path; triton / fla skip the probe
    (here: a broken kernel is run as forced, no warning); fla is for causal modules only."""
    monkeypatch.setattr(triton_ops, "favor_triton", scaled_output)
    x = torch.zeros(1, 1, 4, 16)
    causal, bidirectional = FavorAttention(16, 16, causal=True), FavorAttention(16, 16)
    explicit = FavorAttention(16, 16, causal=True, impl="triton")
    monkeypatch.setenv(probe.ENV_IMPL, "batched")
    assert {fa.resolve_impl(x) for fa in (causal, bidirectional, explicit)} == {"batched"}
    monkeypatch.setenv(probe.ENV_IMPL, "triton")
    assert {fa.resolve_impl(x) for fa in (causal, bidirectional, explicit)} == {"triton"}
    assert FavorAttention(16, 16, kernel="softmax_trig").resolve_impl(x) == "batched"
    assert FavorAttention(16, 16, impl="scan").resolve_impl(x) == "scan"  # explicit PyTorch paths stay
    if fla_backend.fla_available():
        monkeypatch.setenv(probe.ENV_IMPL, "fla")
        assert causal.resolve_impl(x) == explicit.resolve_impl(x) == "fla"
        assert bidirectional.resolve_impl(x) == "batched"
    assert probe.RESULTS == {} and not warnings_of(caplog)


def test_environment_rejects_bad_values_and_leaves_the_cpu_alone(monkeypatch):
    monkeypatch.delenv(probe.ENV_IMPL, raising=False)
    fa = FavorAttention(16, 16, causal=True)
    monkeypatch.setenv(probe.ENV_IMPL, "cuda")
    with pytest.raises(ValueError, match=f"{probe.ENV_IMPL} must be one of batched, triton, fla"):
        FavorAttention(16, 16)
    monkeypatch.setattr(probe, "FAST_DEVICE_TYPES", ("cuda", "cpu"))
    with pytest.raises(ValueError, match=probe.ENV_IMPL):
        fa.resolve_impl(torch.zeros(1, 1, 4, 16))
    monkeypatch.setattr(probe, "FAST_DEVICE_TYPES", ("cuda",))
    monkeypatch.setenv(probe.ENV_IMPL, "triton")  # CPU tensors: the CPU rule, not the forced path
    assert fa.resolve_impl(torch.zeros(1, 1, 4, 16)) == "batched"
    assert FavorAttention(16, 16).resolve_impl(torch.zeros(4, 8, 512, 16)) == "scan"


def test_dot_precision_sets_the_bound(monkeypatch):
    """64 u of the dots: float32 in the interpreter; on a GPU fla's TRITON_F32_DEFAULT (TF32 unless
    ieee) and the Triton kernels' PROTEIN_PERFORMER_TRITON_DOT; plus one rounding step of the dtype."""
    assert probe.tolerance("fla", "cpu", torch.float32) == (64 * 2.0**-24, 2.0**-23)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels are already built: only the bound looks
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    assert probe.tolerance("fla", "cuda", torch.bfloat16) == (64 * 2.0**-11, 2.0**-7)
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    assert probe.tolerance("fla", "cuda", torch.float16) == (64 * 2.0**-24, 2.0**-10)
    monkeypatch.setattr(triton_ops, "DOT_PRECISION", "tf32x3")
    assert probe.dot_unit_roundoff("triton", "cuda") == 2.0**-21
