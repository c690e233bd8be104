"""The FAVOR+ reference (protein_performer.model.favor.reference) is an independent oracle: it is
written from the equations on plain tensors and imports nothing of the code it checks, every path of
``FavorAttention`` equals it, and a bug planted in the module's feature map makes them differ.

Tolerances, relative to the largest entry. float64: the reference and the module compute the same
sums in another order, so the positive kernels agree to a few units of 2^-52 (measured: < 2e-15,
outputs and gradients); TOL64 = 1e-12 leaves a wide margin and stays far below every planted bug
(measured: >= 1.6e-5, the relu one; the others >= 5e-2). Trigonometric features are signed, so
K'^T V sums with cancellation and the order matters: the bidirectional gradients of q and k differ
by up to 5e-10 (plain autograd through Q' (K'^T V) differs from the reference by as much), hence
TOL_TRIG = 1e-8 (its planted bug: >= 4.6e-3). float32 (triton): 64 u, as in tests/model/test_favor_triton.py.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

from protein_performer.model.favor import FUSED_KINDS, KERNELS, FavorAttention, FeatureMap, features, module, reference

REFERENCE = Path(reference.__file__)
TOL64 = 1e-12
TOL_TRIG = 1e-8
TOL32 = 64 * 2.0**-24


def qkv(b=2, h=2, length=29, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, 17] *= 3  # a key that raises the (causal) stabilizer in the middle
    return q, k, v


def padding(b=2, length=29):
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[0, [0, 3, 4, 20]] = True  # a first key that is a pad: causal row 0 sees no key (output 0)
    mask[1, 22:] = True
    return mask


def ref(fa: FavorAttention, q, k, v, mask=None):
    return reference.favor_attention(q, k, v, fa.projection, fa.kind, fa.causal, fa.eps, mask)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| relative to the largest |y|."""
    return ((x - y).abs().max() / y.abs().max()).item()


def test_reference_imports_nothing_from_the_package():
    """The oracle imports torch and math only: no protein_performer module, no relative import,
    not even under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(REFERENCE.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {REFERENCE.name}: {ast.unparse(node)}"
            found.add(node.module.split(".")[0])
    assert found <= {"__future__", "math", "torch"}, found


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_module_equals_reference(kernel, causal):
    """Forward (batched and scan), its three gradients and the explicit attention matrix equal the
    reference, with pads inside, at the end and first, float64."""
    q, k, v = qkv()
    mask = padding()
    tol = TOL_TRIG if kernel == "softmax_trig" else TOL64
    grad = torch.randn(2, 2, 29, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    impls = ["batched"] if kernel == "softmax_trig" else ["batched", "scan"]
    for impl in impls:
        fa = FavorAttention(16, 32, kernel=kernel, causal=causal, chunk_size=8, seed=1, impl=impl).double()
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, want = fa(*x, key_padding_mask=mask), ref(fa, *x, mask)
        assert rel_err(out, want) < tol, (impl, rel_err(out, want))
        for name, a, b in zip("qkv", torch.autograd.grad(out, x, grad), torch.autograd.grad(want, x, grad)):
            assert rel_err(a, b) < tol, (impl, f"d{name}", rel_err(a, b))
    amap = fa.attention_matrix(q, k, key_padding_mask=mask)
    want = reference.attention_matrix(q, k, fa.projection, kernel, causal, fa.eps, mask)
    assert rel_err(amap, want) < TOL64


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_triton_equals_reference(kernel, causal):
    """The Triton kernels (interpreted on the CPU) in float32 against the float64 reference."""
    pytest.importorskip("triton")
    if not module.triton_available():
        pytest.skip("the triton kernels do not import")
    q, k, v = qkv(length=21, d=8)
    mask = padding(length=21)
    fa = FavorAttention(8, 16, kernel=kernel, causal=causal, chunk_size=8, seed=2, impl="triton")
    x = [t.float().requires_grad_(True) for t in (q, k, v)]
    out = fa(*x, key_padding_mask=mask)
    want = ref(fa, q, k, v, mask)
    assert rel_err(out.double(), want) < TOL32, rel_err(out.double(), want)


# ------------------------------------------------------------------------------ planted bugs
def _logits_without_half_norm(x, projection, hyperbolic=False):
    """softmax logits that forget the -|x|^2/2 term: exp(w^T x) is not a softmax-kernel feature."""
    if hyperbolic:
        projection = torch.cat([projection, -projection], dim=0)
    return torch.einsum("bhld,md->bhlm", x, projection)


def _fused_key_without_half_norm(self, x, w, mask):
    """``FeatureMap.fused_key`` (softmax) without the -|x|^2/2 term: r exp(w^T x - s), s its max."""
    z = x @ w.T
    s = z.amax(dim=-1)
    b = torch.exp(z - s.unsqueeze(-1)) * w.shape[0] ** -0.5
    return (b if mask is None else b.masked_fill(mask.unsqueeze(-1), 0.0)), s


def _times(method, factor):
    """A FeatureMap method whose result is off by ``factor``."""
    return lambda self, *args: method(self, *args) * factor


def _relu_scaled(fn, factor):
    """relu features whose relu part is off by ``factor`` (only the floor eps makes it visible)."""
    return lambda x, projection, *args, **kwargs: fn(x, projection * factor, *args, **kwargs)


SOFTMAX = ("softmax", "softmax_hyp")
BUGS = {
    # name: (kernels, the paths it touches, patch(monkeypatch))
    "no |x|^2/2 in the key logits": (
        SOFTMAX,
        ("batched",),
        lambda mp: mp.setattr(features, "softmax_logits", _logits_without_half_norm),
    ),
    "no |x|^2/2 in the fused key features": (
        SOFTMAX,
        ("scan",),
        lambda mp: mp.setattr(FeatureMap, "fused_key", _fused_key_without_half_norm),
    ),
    "data normalizer 1.1 d^-1/4": (
        KERNELS,
        ("batched", "scan"),
        lambda mp: mp.setattr(FeatureMap, "scaled", _times(FeatureMap.scaled, 1.1)),
    ),
    "relu features times 1.01": (
        ("relu",),
        ("batched",),
        lambda mp: mp.setattr(features, "relu_kernel", _relu_scaled(features.relu_kernel, 1.01)),
    ),
    "fused directions times 1.01": (
        FUSED_KINDS,
        ("scan",),
        lambda mp: mp.setattr(FeatureMap, "directions", _times(FeatureMap.directions, 1.01)),
    ),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bug", list(BUGS))
def test_a_bug_planted_in_the_feature_map_fails_the_reference(monkeypatch, bug, causal):
    """The module equals the reference; with a bug planted in its feature map it differs by far more
    than the tolerance (>= 100x), for every kernel and path the bug touches (batched features, the
    scan's fused ones): the reference does not share the module's feature code, so it cannot share
    its bugs."""
    kernels, impls, plant = BUGS[bug]
    q, k, v = qkv()
    mask = padding()
    cases = list(itertools.product(itertools.product(kernels, impls), [mask, None]))
    models = {
        (kernel, impl): FavorAttention(16, 32, kernel=kernel, causal=causal, chunk_size=8, seed=3, impl=impl).double()
        for kernel, impl in itertools.product(kernels, impls)
    }
    tol = {kernel: TOL_TRIG if kernel == "softmax_trig" else TOL64 for kernel in kernels}
    for case, m in cases:
        assert rel_err(models[case](q, k, v, m), ref(models[case], q, k, v, m)) < tol[case[0]], case
    plant(monkeypatch)
    for case, m in cases:
        err = rel_err(models[case](q, k, v, m), ref(models[case], q, k, v, m))
        assert err > 100 * tol[case[0]], (bug, case, err)
