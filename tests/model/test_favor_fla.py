"""Causal FAVOR+ on flash-linear-attention's kernels (favor/fla_backend.py) against the PyTorch path.

Runs fla-core's Triton kernels on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set here
and in conftest.py before triton is imported). Skipped when triton or fla-core is absent.
fla-core 0.6.0 with triton 3.9 needs two workarounds in interpreter mode
(``fla_backend.interpreter_workarounds``), applied by the ``fla_interpreter`` fixture and undone
after the module: (1) autotuning benchmarks its configs on a GPU driver, which the interpreter has
not: keep only the first config; (2) fla's kernels call ``.to(tl.int64)`` on the index of a Python
``range`` loop, which the compiler turns into a tensor but the interpreter leaves a Python int:
give those indices a no-op ``.to``.

Tolerances. The reference is the batched path (causal.causal_linear_attention) in float64 (exact
to ~1e-15 here). Every output and gradient is a sum of at most L m (< 10^4) terms made of
features m^-1/2 exp(logit - max) whose logits are O(10): each feature carries a relative error of
about |logit| u (u = 2^-24, the float32 unit roundoff), a blocked sum adds about log2(L m) u, and
fla's gate adds the rounding of its cumulative sum inside a chunk (c_j - c_i from a float32 cumsum
of c_{i-1} - c_i: about 64 |c| u in the exponent). So the error stays below TOL32 = 64 u of the
largest entry (a few x margin); the float32 batched path is held to the same bound, which shows
that the bound is not vacuous. float16 features (fed to fla as they are): each input of a product
is rounded once to float16 (2^-11 relative), fla accumulates in float32 and rounds [N | D] and the
gradients to float16 once more: 2 * 2^-11 per product plus 2 * 2^-11 for the ratio gives
TOL16 = 8 * 2^-11 of the largest entry (about 2x margin).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pytest.importorskip("fla.ops.simple_gla")

from protein_performer.model.favor import FavorAttention  # noqa: E402
from protein_performer.model.favor.causal import causal_linear_attention  # noqa: E402
from protein_performer.model.favor.features import causal_stabilizer  # noqa: E402
from protein_performer.model.favor.fla_backend import (  # noqa: E402
    favor_causal_fla,
    favor_causal_fla_normalized,
    gate_stabilizer,
    interpreter_workarounds,
)

U32 = 2.0**-24
TOL32 = 64 * U32
TOL16 = 8 * 2.0**-11


@pytest.fixture(scope="module", autouse=True)
def fla_interpreter():
    """The two interpreter-mode workarounds for fla-core 0.6.0 on triton 3.9 (module docstring)."""
    with interpreter_workarounds():
        yield


def qkv(length, d, b=1, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, length // 2] *= 3  # the causal stabilizer moves in the middle of the sequence
    return q, k, v


def padding(b, length):
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[0, :3] = True  # left padding: the first queries see no real key (output 0)
    mask[-1, -7:] = True  # right padding
    return mask


def favor(fa, q, k, v, mask, backend, dtype):
    """Causal FAVOR+ softmax as ``FavorAttention`` computes it (its features, per-key scales and eps
    floor), with the causal product of ``backend``; gradients of q, k, v and the projection."""
    fa.projection.grad = None
    fa.projection.requires_grad_(True)
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    q_prime = fa.features(q, True)
    k_hat, key_scale = fa.causal_key_features(k, mask)
    if backend == "fla":
        out = favor_causal_fla(q_prime, k_hat, v, key_scale, fa.feature_floor(), mask)
    else:
        out = causal_linear_attention(q_prime, k_hat, v.to(q_prime.dtype), 32, key_scale, fa.feature_floor(), mask)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    return [x.detach().double() for x in (out, q.grad, k.grad, v.grad, fa.projection.grad)]


def max_rel_err(got, ref):
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]


@pytest.mark.parametrize(
    "length, d, m, kernel, masked",
    [(64, 32, 64, "softmax", False), (130, 16, 32, "softmax", True), (97, 16, 32, "softmax_hyp", True)],
)
def test_fla_matches_batched_path(length, d, m, kernel, masked):
    """Forward and all gradients (q, k, v, projection) equal the batched path's: one chunk of fla
    exactly, and ragged tails (130 = 2 x 64 + 2, 97) with left and right padding."""
    q, k, v = qkv(length, d)
    mask = padding(q.shape[0], length) if masked else None
    fa = FavorAttention(d, m, kernel=kernel, causal=True, seed=1, impl="batched")
    fa64 = FavorAttention(d, m, kernel=kernel, causal=True, seed=1, impl="batched").double()
    ref = favor(fa64, q, k, v, mask, "batched", torch.float64)
    got = favor(fa, q, k, v, mask, "fla", torch.float32)
    errs = max_rel_err(got, ref)
    assert max(errs) < TOL32, errs
    batched32 = max_rel_err(favor(fa, q, k, v, mask, "batched", torch.float32), ref)
    assert max(batched32) < TOL32, batched32  # the bound holds for the float32 PyTorch path too
    if masked:
        assert torch.all(got[0][0, :, :3] == 0)  # queries that see no real key give 0, not NaN
        assert torch.all(got[3][-1, :, -7:] == 0)  # padded values get no gradient


@pytest.mark.parametrize("eps, least_leak", [(1e-6, 0.1), (0.0, 1e-3)])
def test_fla_keeps_the_running_stabilizer_causal(eps, least_leak):
    """A later key that raises the stabilizer by ~9 leaves every earlier output of the fla path
    bitwise unchanged (its inputs at position i depend on tokens <= i only), while fla's own
    ``normalize=True`` on features with one stabilizer per sequence (the JAX semantics) moves them:
    through the eps floor, and with eps = 0 still through fla's absolute 1e-10 in the denominator
    (q'.z of early queries drops by exp(-9), to ~1e-8 here, so 1e-10 is a ~1% bias)."""
    d, m, length, spike = 16, 32, 130, 100
    q, k, v = qkv(length, d, seed=2)
    fa = FavorAttention(d, m, causal=True, seed=1, impl="batched", eps=eps)
    w = fa.projection
    k_spiked = k.clone()
    k_spiked[:, :, spike] = (w[w.norm(dim=1).argmax()] * d**0.25).double()  # s = |w|^2 / 2, the largest possible
    outs = {}
    for name, keys in (("base", k), ("spiked", k_spiked)):
        with torch.no_grad():
            q_prime = fa.features(q.float(), True)
            k_hat, key_scale = fa.causal_key_features(keys.float())
            outs["exact", name] = favor_causal_fla(q_prime, k_hat, v.float(), key_scale, fa.feature_floor())
            outs["global", name] = favor_causal_fla_normalized(q_prime, fa.features(keys.float(), False), v.float())
    running_max = causal_stabilizer(key_scale)  # of the spiked keys
    assert (running_max[..., -1] - running_max[..., spike - 1]).min() > 8  # the spike raises it for every later query
    assert torch.equal(outs["exact", "base"][..., :spike, :], outs["exact", "spiked"][..., :spike, :])
    leak = (outs["global", "base"][..., :spike, :] - outs["global", "spiked"][..., :spike, :]).abs().max()
    assert leak > least_leak, leak  # the per-sequence max moves earlier outputs (0.76 and 0.038 here)
    assert (outs["exact", "base"][..., spike:, :] - outs["exact", "spiked"][..., spike:, :]).abs().max() > 1e-2


def test_fla_normalized_matches_global_stabilizer():
    """``chunk_linear_attn(normalize=True)`` on features with one stabilizer per sequence equals the
    batched path on the same features (no per-key scales): the JAX semantics, up to fla's absolute
    1e-10 in the denominator (here D > 1e-3, so < 1e-7 relative, inside TOL32)."""
    d, m, length = 16, 32, 100
    q, k, v = qkv(length, d, seed=3)
    mask = padding(1, length)
    fa = FavorAttention(d, m, causal=True, seed=1, impl="batched")
    fa64 = FavorAttention(d, m, causal=True, seed=1, impl="batched").double()

    def run(module, backend, dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        q_prime, k_prime = module.features(x[0], True), module.features(x[1], False, mask)
        if backend == "fla":
            out = favor_causal_fla_normalized(q_prime, k_prime, x[2])
        else:
            out = causal_linear_attention(q_prime, k_prime, x[2], 32)
        out.backward(torch.ones_like(out))
        return [out.detach().double()] + [t.grad.double() for t in x]

    got = run(fa, "fla", torch.float32)
    errs = max_rel_err(got, run(fa64, "batched", torch.float64))
    assert max(errs) < TOL32, errs
    assert torch.all(got[0][0, :, :3] == 0)  # z = 0 (no real key yet): fla gives 0 / (0 + 1e-10) = 0


def test_fla_float16_features():
    """float16 features fed to fla as they are (fp32 accumulation inside; [N | D] and the gradients
    come back in float16): within TOL16 of the float64 batched path."""
    d, m, length = 16, 32, 80
    q, k, v = qkv(length, d, seed=4)
    fa64 = FavorAttention(d, m, causal=True, seed=1, impl="batched").double()
    with torch.no_grad():
        q_prime = fa64.features(q, True)
        k_hat, key_scale = fa64.causal_key_features(k)
    results = []
    for dtype, backend in ((torch.float64, "batched"), (torch.float16, "fla")):
        x = [t.detach().to(dtype).requires_grad_() for t in (q_prime, k_hat, v)]
        if backend == "fla":
            out = favor_causal_fla(*x, key_scale.float(), fa64.feature_floor())
        else:
            out = causal_linear_attention(*x, 32, key_scale, fa64.feature_floor())
        assert out.dtype == dtype
        out.backward(torch.ones_like(out))
        results.append([out.detach().double()] + [t.grad.double() for t in x])
    errs = max_rel_err(results[1], results[0])
    assert max(errs) < TOL16, errs


def test_gate_stabilizer_is_the_running_max_and_never_grows_the_state():
    """From the first real key on it is ``causal_stabilizer``; before it, the first real key's scale,
    so that every gate c_{i-1} - c_i is <= 0; all padded gives 0."""
    s = torch.tensor([[[3.0, -5.0, 1.0, 4.0, 2.0]]])
    mask = torch.tensor([[True, True, False, False, False]])
    c = gate_stabilizer(s, mask)
    assert c.tolist() == [[[1.0, 1.0, 1.0, 4.0, 4.0]]]
    assert torch.equal(c[..., 2:], causal_stabilizer(s, mask)[..., 2:])
    assert gate_stabilizer(s, torch.ones_like(mask)).tolist() == [[[0.0] * 5]]


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_favor_attention_impl_fla(kernel):
    """``FavorAttention(impl="fla")`` runs the fla path with the module's own features and floor:
    forward and input gradients equal the batched path's within the float32 bound."""
    q, k, v = qkv(80, 16)
    mask = padding(q.shape[0], 80)
    outs = []
    for impl in ("fla", "batched"):
        fa = FavorAttention(16, 32, kernel=kernel, causal=True, seed=2, impl=impl)
        x = [t.clone().float().requires_grad_() for t in (q, k, v)]
        out = fa(*x, key_padding_mask=mask)
        out.backward(torch.ones_like(out))
        outs.append([out.detach(), *(t.grad for t in x)])
    errs = max_rel_err(outs[0], outs[1])
    assert max(errs) < TOL32, errs
