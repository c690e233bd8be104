"""FAVOR+ attention (protein_performer.model.favor): features, kernels, causal kernel, API contracts.

Statistical tests use fixed seeds; their tolerances come from the variance formulas of the paper
(Lemma 2: for iid positive features, MSE(m) = exp(|x+y|^2) SM(x,y)^2 (1 - exp(-|x+y|^2)) / m).
"""

from __future__ import annotations

import math

import pytest
import torch

from protein_performer.model.attention import SoftmaxAttention
from protein_performer.model.favor import (
    FUSED_KINDS,
    KERNELS,
    FavorAttention,
    FavorState,
    FeatureMap,
    causal_linear_attention,
    causal_product,
    causal_stabilizer,
    draw_projection,
    linear_attention,
    reference,
    softmax_logits,
)
from protein_performer.model.performer import PerformerConfig, PerformerLM


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(b=2, h=3, length=37, d=16, scale=1.0, seed=0, dtype=torch.float64):
    g = gen(seed)
    return tuple(scale * torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3))


def naive_favor(fa: FavorAttention, q, k, v, key_padding_mask=None):
    """The explicit reference on ``fa``'s projection and constants (plain tensors: none of fa's code runs)."""
    return reference.favor_attention(q, k, v, fa.projection, fa.kind, fa.causal, fa.eps, key_padding_mask)


# ------------------------------------------------------------------------------ random features
def test_projection_shapes_norms_and_orthogonal_blocks():
    d, m = 16, 2 * 16 + 5
    w = draw_projection(m, d, gen(0), orthogonal=True, norm="sqrt_d", dtype=torch.float64)
    assert w.shape == (m, d)
    torch.testing.assert_close(w.norm(dim=1), torch.full((m,), math.sqrt(d), dtype=torch.float64))
    for start in range(0, m, d):  # rows inside one block are exactly orthogonal
        block = w[start : start + d]
        gram = block @ block.T
        torch.testing.assert_close(gram, d * torch.eye(len(block), dtype=torch.float64), atol=1e-10, rtol=0)
    # rows of different blocks are independent: not orthogonal
    assert (w[:d] @ w[d : 2 * d].T).abs().max() > 1.0
    iid = draw_projection(m, d, gen(0), orthogonal=False, dtype=torch.float64)
    assert (iid[:d] @ iid[:d].T - torch.diag(iid[:d].norm(dim=1) ** 2)).abs().max() > 1.0


def test_projection_is_gaussian_marginally():
    """Chi row norms make every row N(0, I_d): entries have mean 0 and variance 1.

    4096 x 16 entries: the sample variance has std sqrt(2 / 65536) = 0.0055 for independent
    entries (blocks add weak dependence), so |var - 1| < 0.04 and |mean| < 0.03 are > 5 sigma.
    Squared row norms are chi^2_d: mean d, std of the mean sqrt(2 d / 4096) = 0.088 -> 0.5.
    """
    d, m = 16, 4096
    for orthogonal in (True, False):
        w = draw_projection(m, d, gen(1), orthogonal=orthogonal, norm="chi", dtype=torch.float64)
        assert abs(w.mean().item()) < 0.03
        assert abs(w.var().item() - 1.0) < 0.04
        assert abs((w**2).sum(1).mean().item() - d) < 0.5


def test_qr_sign_correction_makes_blocks_haar():
    """Haar orthogonal matrices have diagonal entries of mean 0; LAPACK's QR without the sign
    correction gives a mean near -0.2 (d = 8). 400 draws x 8 entries, each of variance 1/d:
    std of the mean <= sqrt(1 / (8 * 3200)) = 0.0063 -> tolerance 0.04 (6 sigma)."""
    d = 8
    diag = [
        torch.diagonal(draw_projection(d, d, gen(s), orthogonal=True, norm="sqrt_d", dtype=torch.float64)).mean()
        / math.sqrt(d)
        for s in range(400)
    ]
    assert abs(torch.stack(diag).mean().item()) < 0.04


def test_projection_seeded_and_validated():
    a = draw_projection(40, 16, gen(3))
    assert torch.equal(a, draw_projection(40, 16, gen(3)))
    assert not torch.equal(a, draw_projection(40, 16, gen(4)))
    with pytest.raises(ValueError, match="norm"):
        draw_projection(4, 4, gen(0), norm="unit")


# ------------------------------------------------------------------------------ estimator statistics
def _kernel_estimates(x, y, m, orthogonal, seeds):
    """phi(x)^T phi(y) for each seed, phi(x) = exp(w^T x - |x|^2/2) / sqrt(m): (seeds, l, l)."""
    out = []
    for s in seeds:
        w = draw_projection(m, x.shape[-1], gen(s), orthogonal=orthogonal, dtype=torch.float64)
        phi_x = torch.exp(softmax_logits(x, w)) / math.sqrt(m)
        phi_y = torch.exp(softmax_logits(y, w)) / math.sqrt(m)
        out.append((phi_x @ phi_y.transpose(-1, -2))[0, 0])
    return torch.stack(out)


def _lemma2_mse(x, y, m):
    """Paper Lemma 2, iid positive features: exp(|x+y|^2) SM^2 (1 - exp(-|x+y|^2)) / m, (l, l)."""
    x, y = x[0, 0], y[0, 0]
    sq = ((x[:, None, :] + y[None, :, :]) ** 2).sum(-1)
    sm = torch.exp(x @ y.T)
    return torch.exp(sq) * sm**2 * (1 - torch.exp(-sq)) / m


@pytest.fixture(scope="module")
def small_pairs():
    # |x|^2 ~ 0.5: per-feature relative variance exp(|x+y|^2) - 1 ~ 1.7, light tails
    g = gen(11)
    d = 16
    x = 0.18 * torch.randn(1, 1, 12, d, generator=g, dtype=torch.float64)
    y = 0.18 * torch.randn(1, 1, 12, d, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("orthogonal", [False, True])
def test_positive_features_unbiased(small_pairs, orthogonal):
    """Mean over N = 300 draws of phi(x)^T phi(y) = exp(x^T y): each of the 144 pairs within
    5 sigma, sigma^2 = MSE_Lemma2(m) / N (orthogonal features have a smaller MSE, Theorem 2)."""
    x, y = small_pairs
    m, n_draws = 32, 300
    est = _kernel_estimates(x, y, m, orthogonal, range(n_draws))
    exact = torch.exp(x[0, 0] @ y[0, 0].T)
    sigma = (_lemma2_mse(x, y, m) / n_draws).sqrt()
    z = (est.mean(0) - exact) / sigma
    assert z.abs().max() < 5.0, z.abs().max()


def test_mse_falls_as_one_over_m(small_pairs):
    """iid features: the empirical MSE matches Lemma 2 (so m * MSE is constant) at m = 8, 32, 128.

    The MSE estimate from N = 200 draws of near-Gaussian errors has relative std ~ sqrt(2/200) =
    0.1, so the ratio empirical / theory must lie in [0.65, 1.5] (>= 3.5 sigma)."""
    x, y = small_pairs
    exact = torch.exp(x[0, 0] @ y[0, 0].T)
    ratios = []
    for m in (8, 32, 128):
        est = _kernel_estimates(x, y, m, False, range(1000, 1200))
        ratios.append((((est - exact) ** 2).mean() / _lemma2_mse(x, y, m).mean()).item())
    assert all(0.65 < r < 1.5 for r in ratios), ratios


def test_orthogonal_features_beat_iid():
    """Attention-matrix MSE (paper's approximation study, d = 16, L = 64), averaged over 40
    draws: orthogonal below iid at m = 16 and m = 64."""
    g = gen(5)
    d, length = 16, 64
    q = 0.5 * torch.randn(1, 1, length, d, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(1, 1, length, d, generator=g, dtype=torch.float64)
    exact = SoftmaxAttention().attention_matrix(q, k).double()
    for m in (16, 64):
        mse = {}
        for orthogonal in (True, False):
            errs = []
            for seed in range(40):
                fa = FavorAttention(d, m, orthogonal=orthogonal, seed=seed).double()
                errs.append(((fa.attention_matrix(q, k) - exact) ** 2).mean())
            mse[orthogonal] = torch.stack(errs).mean().item()
        assert mse[True] < 0.9 * mse[False], (m, mse)


def test_averaged_attention_converges_to_exact():
    """The normalized estimate is a ratio (bias O(1/m)); averaging 100 draws must cut the error of
    one draw by far more than the bias allows: RMSE(mean of 100) < 0.3 RMSE(one draw) (an unbiased
    estimator would give 0.1)."""
    q, k, _ = qkv(1, 1, 48, 16, scale=0.5, seed=2)
    exact = SoftmaxAttention().attention_matrix(q, k).double()
    maps = torch.stack([FavorAttention(16, 64, seed=s).double().attention_matrix(q, k) for s in range(100)])
    single = ((maps - exact) ** 2).mean().sqrt()
    averaged = ((maps.mean(0) - exact) ** 2).mean().sqrt()
    assert averaged < 0.3 * single, (averaged, single)


def test_favor_close_to_exact_at_m256():
    """d = 64, m = 256, entries of q, k ~ N(0, 0.09): |x|^2 ~ 0.72 after the d^-1/4 scaling, so each
    kernel value has relative std sqrt((exp(|x+y|^2) - 1) / m) ~ 0.11 (Lemma 2, iid) and the L1
    distance of a map row to the exact row is about sqrt(2 / pi) 0.11 ~ 0.09; orthogonal features
    do better. Bound: 0.12 for every row on average, per kernel."""
    q, k, _ = qkv(1, 4, 128, 64, scale=0.3, seed=3)
    exact = SoftmaxAttention().attention_matrix(q, k).double()
    for kernel in ("softmax", "softmax_hyp"):
        approx = FavorAttention(64, 256, kernel=kernel, seed=0).double().attention_matrix(q, k)
        l1 = (approx - exact).abs().sum(-1).mean()
        assert l1 < 0.12, (kernel, l1)


# ------------------------------------------------------------------------------ positivity, numerics
def test_positive_kernels_never_negative_trig_can_be():
    q, k, v = qkv(1, 2, 64, 16, scale=3.0, seed=4)
    for kernel in ("softmax", "softmax_hyp", "relu"):
        fa = FavorAttention(16, 32, kernel=kernel, seed=1).double()
        assert fa.features(q, True).min() >= 0 and fa.features(k, False).min() >= 0
        assert fa.attention_matrix(q, k).min() >= 0
    trig = FavorAttention(16, 32, kernel="softmax_trig", seed=1).double()
    assert trig.attention_matrix(q, k).min() < 0  # the instability the paper warns about


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_autocast_bf16_large_norms_finite(kernel):
    """L = 8192, inputs with norms 10x typical (N(0, 100) entries), bf16 autocast: fp32 features
    and sums, finite outputs and gradients, output in the input dtype, rows of the map sum to 1."""
    g = gen(6)
    q, k, v = (10 * torch.randn(1, 2, 8192, 64, generator=g) for _ in range(3))
    q, k, v = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    for causal in (False, True):
        fa = FavorAttention(64, 256, kernel=kernel, causal=causal, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fa(q, k, v)
            assert fa.features(q, True).dtype == torch.float32
        assert out.dtype == torch.bfloat16
        assert torch.isfinite(out.float()).all()
        out.float().square().mean().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad.float()).all()
            t.grad = None
    fa = FavorAttention(64, 256, kernel=kernel, causal=True, seed=0)
    rows = fa.attention_matrix(q[:, :1, :1024].detach(), k[:, :1, :1024].detach()).sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ causal kernel
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_causal_product_matches_naive_reference(chunk):
    """Forward and all three gradients equal those of tril(a b^T) c through autograd (float64),
    with chunk sizes that divide L, do not divide it, and exceed it."""
    g = gen(7)
    a = torch.rand(2, 2, 21, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 2, 21, 6, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 21, 5, generator=g, dtype=torch.float64, requires_grad=True)
    naive = torch.einsum("...ij,...je->...ie", (a @ b.transpose(-1, -2)).tril(), c)
    out = causal_product(a, b, c, chunk)
    torch.testing.assert_close(out, naive, atol=1e-12, rtol=0)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(out, (a, b, c), grad)
    ref = torch.autograd.grad(naive, (a, b, c), grad)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", [3, 16])
def test_causal_product_gradcheck(chunk):
    g = gen(8)
    a = torch.rand(1, 2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: causal_product(*t, chunk), (a, b, c))


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_module_gradients_equal_naive_reference(kernel):
    q, k, v = (t.requires_grad_(True) for t in qkv(2, 2, 30, 8, seed=8))
    fa = FavorAttention(8, 16, kernel=kernel, causal=True, chunk_size=8, seed=2).double()
    out = fa(q, k, v)
    ref = naive_favor(fa, q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn(out.shape, generator=gen(9), dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("eps", [0.0, None, 1e-2])
def test_causal_equals_bidirectional_on_prefix(eps):
    """Position i of causal attention = bidirectional attention over tokens 0..i, with the eps
    floor too (None = each kernel's default): the key stabilizer of position i is the running
    max over keys 0..i, exactly the stabilizer the bidirectional model computes on the prefix.
    Key 25 is made large so that the stabilizer jumps in the middle of a chunk."""
    q, k, v = qkv(1, 2, 40, 16, seed=10)
    k[:, :, 25] *= 3
    for kernel in KERNELS:
        if kernel == "softmax_trig" and eps:
            continue  # no eps floor in trigonometric features
        causal = FavorAttention(16, 32, kernel=kernel, causal=True, chunk_size=7, eps=eps, seed=3).double()
        bidir = FavorAttention(16, 32, kernel=kernel, causal=False, eps=eps, seed=3).double()
        out = causal(q, k, v)
        for i in (0, 1, 6, 7, 20, 24, 25, 26, 39):
            prefix = bidir(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1])[:, :, -1]
            torch.testing.assert_close(out[:, :, i], prefix, atol=1e-10, rtol=1e-10)
    # the pure functions, with the default eps, on the same features
    fa = FavorAttention(16, 32, seed=3).double()
    qp, kp = fa.features(q, True), fa.features(k, False)
    out = causal_linear_attention(qp, kp, v, chunk=5)
    for i in (0, 4, 5, 39):
        ref = linear_attention(qp[:, :, : i + 1], kp[:, :, : i + 1], v[:, :, : i + 1])[:, :, -1]
        torch.testing.assert_close(out[:, :, i], ref, atol=1e-12, rtol=1e-12)


naive_scaled_product = reference.causal_product


@pytest.mark.parametrize("floor", [0.0, 0.3])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 7, 32])
def test_scaled_causal_product_matches_naive_reference(chunk, scaled, floor):
    """With per-key scales (the causal stabilizer) and an eps floor, the chunked product and its
    three gradients equal the explicit reference; the scales jump by 30 and 60 inside and across
    chunks. gradcheck on a small case too."""
    g = gen(21)
    a = torch.rand(2, 2, 23, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 2, 23, 6, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 23, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = 3 * torch.randn(2, 2, 23, generator=g, dtype=torch.float64)
    s[:, :, 5] += 30
    s[:, 1, 13] += 60
    cq = causal_stabilizer(s)
    scales = (s, cq) if scaled else (None, None)
    out = causal_product(a, b, c, chunk, *scales, floor=floor)
    ref = naive_scaled_product(a, b, c, *scales, floor=floor)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(out, (a, b, c), grad), torch.autograd.grad(ref, (a, b, c), grad)):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)
    small_scales = (s[:1, :1, :9], causal_stabilizer(s[:1, :1, :9])) if scaled else (None, None)
    small = [t[:1, :1, :9].detach().requires_grad_(True) for t in (a, b, c)]
    assert torch.autograd.gradcheck(lambda *t: causal_product(*t, 3, *small_scales, floor=floor), small)


def test_causal_later_keys_do_not_change_earlier_outputs():
    """Strict causality with the default eps: key 30 set to the longest feature direction (the key
    with the largest possible logit |w|^2/2, which raises the stabilizer) leaves every output
    before it unchanged and gets no gradient from them (with one stabilizer over the whole
    sequence, as in the released code, it would shift them through the eps floor)."""
    q, k, v = qkv(1, 2, 48, 16, seed=22)
    fa = FavorAttention(16, 32, causal=True, chunk_size=8, seed=1).double()
    base = fa(q, k, v)
    k2 = k.clone()
    k2[:, :, 30] = fa.projection[fa.projection.norm(dim=1).argmax()] * 16**0.25
    k2.requires_grad_(True)
    out = fa(q, k2, v)
    torch.testing.assert_close(out[:, :, :30], base[:, :, :30], atol=1e-13, rtol=0)
    assert (out[:, :, 30:] - base[:, :, 30:]).abs().max() > 1e-3
    (grad,) = torch.autograd.grad(out[:, :, :30].sum(), k2)
    assert grad[:, :, 30:].abs().max() == 0


def test_causal_no_overflow_when_the_stabilizer_jumps():
    """float32, keys whose logits grow by far more than float32's exp range (88) within a chunk and
    across chunks: outputs stay finite and equal the float64 reference (prefix by prefix)."""
    q, k, v = qkv(1, 2, 64, 16, seed=23)
    k[:, :, 10] *= 12  # inside chunk 0 (C = 16)
    k[:, :, 40] *= 20  # a later chunk
    fa = FavorAttention(16, 32, causal=True, chunk_size=16, seed=2)
    out = fa(q.float(), k.float(), v.float())
    assert torch.isfinite(out).all()
    ref = naive_favor(fa.double(), q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_padding_equals_running_without_pads(causal, kernel):
    """Padded keys leave numerator and denominator: the real tokens' outputs equal those of the
    sequence with the pads removed. Pad keys are set to the longest feature direction (after the
    d^-1/4 scaling), the key with the largest possible logit |w|^2/2: a pad inside the key
    stabilizer (or in the denominator) would change the result."""
    q, k, v = qkv(2, 2, 24, 16, seed=12)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[0, [3, 4, 10, 20, 21, 22, 23]] = True  # pads inside and at the end
    mask[1, 17:] = True
    fa = FavorAttention(16, 32, kernel=kernel, causal=causal, chunk_size=8, seed=4).double()
    longest = fa.projection[fa.projection.norm(dim=1).argmax()] * 16**0.25
    k = torch.where(mask[:, None, :, None], longest, k)
    out = fa(q, k, v, key_padding_mask=mask)
    amap = fa.attention_matrix(q, k, key_padding_mask=mask)
    for i in range(2):
        keep = ~mask[i]
        alone = fa(q[i : i + 1, :, keep], k[i : i + 1, :, keep], v[i : i + 1, :, keep])
        torch.testing.assert_close(out[i : i + 1, :, keep], alone, atol=1e-10, rtol=1e-10)
        assert amap[i][..., mask[i]].abs().max() == 0


# ------------------------------------------------------------------------------ seeds, API
def test_redraw_is_deterministic_and_state_dict_has_projection():
    q, k, v = qkv(1, 2, 16, 16, seed=13, dtype=torch.float32)
    a = FavorAttention(16, 32, seed=0)
    b = FavorAttention(16, 32, seed=99)
    assert not torch.equal(a(q, k, v), b(q, k, v))
    a.redraw(7)
    b.redraw(7)
    assert torch.equal(a(q, k, v), b(q, k, v))
    assert torch.equal(a.projection, FavorAttention(16, 32, seed=7).projection)
    b.redraw(8)
    assert not torch.equal(a(q, k, v), b(q, k, v))
    assert list(a.parameters()) == []
    assert list(a.state_dict()) == ["projection"]
    c = FavorAttention(16, 32, seed=1)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(q, k, v), a(q, k, v))


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_features_and_their_chain_rule_equal_autograd(kind):
    """``FeatureMap.fused_*`` (the scan's and the Triton host's features, with their hand-written
    gradients) equal the batched features and autograd through them, float64 (same sums in another
    order: a few units of 2^-52; 1e-12 of the largest entry leaves a wide margin)."""
    d, scale = 8, 8**-0.25
    fm = FeatureMap(d, 16, kind, seed=2).double()
    g = gen(4)
    q, k = (torch.randn(1, 3, 10, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 6] = True
    w = fm.directions(torch.float64)
    flat = lambda x: x.detach().reshape(3, 10, -1).clone()  # noqa: E731
    a = fm.fused_query(flat(q) * scale, w)
    b, s = fm.fused_key(flat(k) * scale, w, mask.expand(3, 10))
    a_ref = fm.features(q, True)
    if kind == "relu":
        b_ref, s_ref = fm.features(k, False, mask), torch.zeros(1, 3, 10, dtype=torch.float64)
    else:
        b_ref, s_ref = fm.causal_key_features(k, mask)
    for got, want in ((a, a_ref), (b, b_ref), (s, s_ref)):
        torch.testing.assert_close(got, want.detach().reshape(got.shape), rtol=0, atol=1e-12 * want.abs().max().item())
    da, db = (torch.randn(1, 3, 10, 16, generator=g, dtype=torch.float64) for _ in range(2))
    dq, dk = torch.autograd.grad([a_ref, b_ref], [q, k], [da, db])  # dL/dq = dL/dxq d^-1/4
    got_q = fm.fused_query_grad(flat(q) * scale, w, a, flat(da)) * scale
    got_k = fm.fused_key_grad(flat(k) * scale, w, b, flat(db)) * scale
    for got, want in ((got_q, dq), (got_k, dk)):
        torch.testing.assert_close(got, flat(want), rtol=0, atol=1e-12 * want.abs().max().item())


# the attention state_dict keys of PerformerLM(vocab_size=25, dim=16, depth=2, heads=2, dim_head=8,
# nb_features=16, attention="favor_softmax"), as checkpoints saved before the FeatureMap split hold them
SAVED_ATTENTION_KEYS = [
    f"blocks.{i}.attn.{name}"
    for i in range(2)
    for name in (
        *(f"{proj}.{p}" for proj in ("to_q", "to_k", "to_v", "to_out") for p in ("weight", "bias")),
        "kernel.projection",
    )
]


@pytest.mark.parametrize("attention, kind", [("favor_softmax", "softmax"), ("favor_relu", "relu")])
def test_checkpoints_keep_loading(attention, kind):
    """``block.attn.kernel`` is the attention core (a ``FeatureMap``, whose ``kind`` names the feature
    kernel), and the state_dict keeps the names of earlier checkpoints, so they load strictly: the
    random features come back with them and the outputs agree."""
    shape = dict(vocab_size=25, dim=16, depth=2, heads=2, dim_head=8, nb_features=16, max_len=32)
    torch.manual_seed(0)
    saved = PerformerLM(PerformerConfig(**shape, attention=attention, causal=True))
    saved.redraw_features(lambda i: 40 + i)
    state = saved.state_dict()
    assert [k for k in state if ".attn." in k] == SAVED_ATTENTION_KEYS
    loaded = PerformerLM(PerformerConfig(**shape, attention=attention, causal=True))
    loaded.load_state_dict(state, strict=True)
    kernel = loaded.blocks[1].attn.kernel
    assert isinstance(kernel, FeatureMap) and kernel.kind == kind
    assert torch.equal(kernel.projection, FavorAttention(8, 16, kernel=kind, causal=True, seed=41).projection)
    tokens = torch.randint(0, 25, (2, 12), generator=gen(0))
    saved.eval(), loaded.eval()
    assert torch.equal(loaded(tokens)["logits"], saved(tokens)["logits"])  # the same weights, the same code


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_matrix_agrees_with_forward(causal, kernel):
    q, k, v = qkv(2, 3, 45, 16, seed=14)
    mask = torch.zeros(2, 45, dtype=torch.bool)
    mask[1, 30:] = True
    fa = FavorAttention(16, 32, kernel=kernel, causal=causal, chunk_size=16, seed=5).double()
    amap = fa.attention_matrix(q, k, key_padding_mask=mask, block_rows=7)
    assert amap.shape == (2, 3, 45, 45)
    torch.testing.assert_close(amap, fa.attention_matrix(q, k, key_padding_mask=mask), atol=1e-14, rtol=0)
    torch.testing.assert_close(amap @ v, fa(q, k, v, key_padding_mask=mask), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 3, 45, dtype=torch.float64), atol=1e-9, rtol=0)
    if causal:
        assert amap.triu(1).abs().max() == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_step_equals_causal_forward_on_prefix(kernel):
    """Recurrent generation: step t gives the last row of the causal forward on tokens 0..t."""
    q, k, v = qkv(2, 2, 12, 8, seed=15)
    k[:, :, 5] *= 4  # a late key that raises the running stabilizer
    fa = FavorAttention(8, 16, kernel=kernel, causal=True, seed=6).double()
    state = fa.init_state(2, 2, 8, dtype=torch.float64)
    for t in range(12):
        out_t, state = fa.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        full = fa(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])[:, :, -1:]
        torch.testing.assert_close(out_t, full, atol=1e-9, rtol=1e-9)
    assert isinstance(state, FavorState) and state.S.shape == (2, 2, 16, 8) and state.z.shape == (2, 2, 16)
    assert state.count.flatten().tolist() == [12.0] * 4 and state.nbytes() == 8 * (2 * 2 * (16 * 8 + 16 + 1 + 8 + 1))


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="kernel"):
        FavorAttention(16, kernel="cosine")
    with pytest.raises(ValueError, match="even"):
        FavorAttention(16, 31, kernel="softmax_hyp")
    fa = FavorAttention(16, 32)
    q, k, v = qkv(1, 1, 8, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        fa(q, k, v, key_padding_mask=torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"\(batch, heads, length, 16\)"):
        fa(q[..., :8], k, v)
    with pytest.raises(RuntimeError, match="causal"):
        fa.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], fa.init_state(1, 1, 16))
