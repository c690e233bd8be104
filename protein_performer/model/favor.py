"""FAVOR+: fast attention via positive orthogonal random features (Choromanski et al., ICLR 2021).

Everything about Performer attention lives in this file, one small pure function per equation:

    draw_projection          the random features w_1..w_m (orthogonal blocks, chi / sqrt(d) norms)
    softmax_kernel           phi(x) = exp(w^T x - |x|^2/2) / sqrt(m)   (FAVOR+, positive, + hyperbolic)
    trig_kernel              phi(x) = exp(|x|^2/2) / sqrt(m) [sin(w^T x), cos(w^T x)]  (comparison only)
    relu_kernel              phi(x) = relu(w^T x) + eps                 (Performer-ReLU)
    linear_attention         D^-1 (Q' ((K')^T V))                       (bidirectional)
    causal_linear_attention  out_i = q'_i S_i / q'_i z_i                (unidirectional, prefix sums)

Notation and shapes: ``b`` batch, ``h`` heads, ``l`` length, ``d`` head dim, ``m`` features,
``e`` value dim (+1 when a column of ones is appended so that the denominator D rides along with
the numerator). The causal kernel works on chunked tensors (B n, C, f): B = b h, n = ceil(l / C)
chunks of C positions.

Numerics (see PAPER.md, "FAVOR+ in one page"):
- q and k are scaled by d^-1/4 each before the feature map (that is softmax's 1/sqrt(d)).
- Softmax features subtract a stabilizer inside the exp: the max over features per row for
  queries (cancels in D^-1), one max per (batch, head) over all real keys and features for keys.
  Both are detached: they are constants, not functions to differentiate. Padded keys are left out
  of the key max, so padding changes nothing for the real tokens.
- Feature maps and every sum run in float32, also under bf16/fp16 autocast; the output is cast
  back to the input dtype.
- Causal attention never materialises an L x m x d prefix tensor: inside a chunk of C positions it
  is a masked (Q' K'^T) V, across chunks an m x e state is summed over the previous chunks. The
  backward pass (``_CausalProduct``) rebuilds the states from the saved q', k', v: forward for
  dQ', in reverse (suffix sums, from the last chunk) for dK' and dV.

Causal stabilizer: the key stabilizer of position i is the running max c_i = max_{j<=i} s_j of the
per-key maxima s_j (``causal_stabilizer``), never a max over later keys. So out_i is exactly the
bidirectional output over tokens 0..i, eps floor included, and equals what recurrent decoding
(``step``) gives. The released JAX code uses one max over the whole sequence for causal attention
too, which lets later keys shift earlier outputs through the eps floor (8.6e-3 in logits at
L = 8192 in study 5 before this change; up to 0.46 in the outputs of early positions for random
inputs at L = 8192). In the chunked kernel the factor exp(s_j - c_i) is
split into three factors that are each <= 1 (per key, per chunk pair, per query), so nothing can
overflow: see ``_ChunkScales``.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from protein_performer.model.attention import check_key_padding_mask

log = logging.getLogger(__name__)

KERNELS = ("softmax", "softmax_hyp", "softmax_trig", "relu")
NORMS = ("chi", "sqrt_d")


# --------------------------------------------------------------------------------------------
# random features
# --------------------------------------------------------------------------------------------
def draw_projection(
    nb_rows: int,
    dim: int,
    generator: torch.Generator,
    orthogonal: bool = True,
    norm: str = "chi",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random feature directions W (nb_rows, dim), the w_i of the FAVOR+ feature maps.

    Orthogonal ("OR", paper Sec. 2.4): blocks of ``dim`` exactly orthogonal rows, each the Q of a
    QR decomposition of a Gaussian matrix with its columns multiplied by sign(diag(R)), which makes
    Q Haar-distributed. The last block is truncated. Row norms: ``"chi"`` gives each row the norm of
    an independent N(0, I_d) vector, so the marginal of every row is N(0, I_d) (unbiased estimator);
    ``"sqrt_d"`` fixes every norm to sqrt(d) (the regularized variant). With ``orthogonal=False``
    the rows are iid N(0, I_d) (``"sqrt_d"`` rescales them to norm sqrt(d)).
    Drawn in float64 on the CPU from ``generator``, so a seed gives the same W on every machine.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if nb_rows < 1 or dim < 1:
        raise ValueError(f"need nb_rows >= 1 and dim >= 1, got {nb_rows} and {dim}")
    if orthogonal:
        blocks = []
        for _ in range(math.ceil(nb_rows / dim)):
            gauss = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gauss)
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign-correct the columns
            blocks.append(q.T)  # rows orthonormal
        w = torch.cat(blocks, dim=0)[:nb_rows]
        if norm == "chi":
            lengths = torch.randn(nb_rows, dim, generator=generator, dtype=torch.float64).norm(dim=1)
        else:
            lengths = torch.full((nb_rows,), math.sqrt(dim), dtype=torch.float64)
        w = w * lengths.unsqueeze(1)
    else:
        w = torch.randn(nb_rows, dim, generator=generator, dtype=torch.float64)
        if norm == "sqrt_d":
            w = w / w.norm(dim=1, keepdim=True) * math.sqrt(dim)
    return w.to(dtype)


# --------------------------------------------------------------------------------------------
# feature maps (x is already scaled by d^-1/4)
# --------------------------------------------------------------------------------------------
def _mask_keys(phi: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the features of padded keys: they leave both Q'(K'^T V) and the denominator."""
    if key_padding_mask is None:
        return phi
    return phi.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def softmax_logits(x: torch.Tensor, projection: torch.Tensor, hyperbolic: bool = False) -> torch.Tensor:
    """The exponents w_i^T x - |x|^2/2 of the positive softmax features, (b, h, l, m).

    Hyperbolic variant: [w^T x - |x|^2/2, -w^T x - |x|^2/2] (2 x the rows of ``projection``).
    One matmul: [x, |x|^2/2] times [W, -1]^T, so the backward pass is a matmul too.
    """
    if hyperbolic:
        projection = torch.cat([projection, -projection], dim=0)
    half_sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (b, h, l, 1)
    x_aug = torch.cat([x, half_sq_norm], dim=-1)  # (b, h, l, d + 1)
    w_aug = torch.cat([projection, -torch.ones_like(projection[:, :1])], dim=-1)  # (m, d + 1)
    return torch.einsum("bhle,me->bhlm", x_aug, w_aug)


class _ExpPlus(torch.autograd.Function):
    """y = exp(z) + const, saving only y (d y / d z = y - const): one L x m tensor, not two."""

    @staticmethod
    def forward(ctx, z, const):
        y = torch.exp(z).add_(const)
        ctx.save_for_backward(y)
        ctx.const = const
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return (y - ctx.const).mul_(grad), None


def key_stabilizer(logits: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One constant per (batch, head): the max over real keys and features, (b, h, 1, 1), detached.

    A (batch, head) with no real key gets 0 (its features are zeroed anyway).
    """
    logits = logits.detach()
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
    c = logits.amax(dim=(-2, -1), keepdim=True)
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def softmax_kernel(
    x: torch.Tensor,
    projection: torch.Tensor,
    is_query: bool,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    hyperbolic: bool = False,
    stabilizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positive random features for the softmax kernel (paper Lemma 1, FAVOR+).

    phi(x) = exp(-|x|^2/2) / sqrt(m) [exp(w_1^T x), ..., exp(w_m^T x)], so that
    E[phi(q)^T phi(k)] = exp(q^T k). Hyperbolic (Lemma 1, second form): the m/2 directions give
    exp(+w^T x) and exp(-w^T x), divided by sqrt(m) (= sqrt(2 * m/2)), the same expectation.
    Computed as ratio * (exp(logits - c) + eps), ratio = m^-1/2: c is the per-row max for queries
    and one constant per (batch, head) for keys (``key_stabilizer``, or the given ``stabilizer``);
    both cancel in D^-1. For queries logits - c = w^T x - max_i w_i^T x: the |x|^2/2 term cancels
    inside the row, so it is never computed. x: (b, h, l, d) already scaled by d^-1/4;
    projection: (m, d), or (m/2, d) if hyperbolic.
    """
    if is_query:
        if hyperbolic:
            projection = torch.cat([projection, -projection], dim=0)
        logits = torch.einsum("bhld,md->bhlm", x, projection)  # w^T x; -|x|^2/2 cancels against c
        c = logits.detach().amax(dim=-1, keepdim=True)
    else:
        logits = softmax_logits(x, projection, hyperbolic)
        c = key_stabilizer(logits, key_padding_mask) if stabilizer is None else stabilizer
    phi = _positive_features(logits, c, eps)
    return phi if is_query else _mask_keys(phi, key_padding_mask)


def _positive_features(logits: torch.Tensor, c: torch.Tensor, eps: float) -> torch.Tensor:
    """ratio * (exp(logits - c) + eps), ratio = m^-1/2, saving one (b, h, l, m) tensor for backward."""
    ratio = logits.shape[-1] ** -0.5
    return _ExpPlus.apply(logits - (c - math.log(ratio)), ratio * eps)


def per_key_features(
    x: torch.Tensor, projection: torch.Tensor, kernel: str, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key features at each key's own scale, for causal attention: (phi_hat (b, h, l, m), s (b, h, l)).

    The features of key j as seen by query i are phi_hat_j exp(s_j - c_i) (+ the eps floor), with
    c_i = ``causal_stabilizer(s)``; s_j is a detached constant (the max of key j's softmax logits,
    or |k_j|^2/2 for trigonometric features), so phi_hat_j carries the whole gradient. Padded keys
    get zero features. x is already scaled by d^-1/4.
    """
    if kernel == "softmax_trig":
        s = (0.5 * (x * x).sum(dim=-1, keepdim=True)).detach()
        phi = trig_kernel(x, projection, False, key_padding_mask, stabilizer=s)
    elif kernel in ("softmax", "softmax_hyp"):
        logits = softmax_logits(x, projection, kernel == "softmax_hyp")
        s = logits.detach().amax(dim=-1, keepdim=True)
        phi = _mask_keys(_positive_features(logits, s, 0.0), key_padding_mask)
    else:
        raise ValueError(f"per-key scales are for the softmax kernels, not {kernel!r}")
    return phi, s[..., 0]


def causal_stabilizer(key_scale: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The running max c_i = max_{j <= i, j real} s_j over keys, (b, h, l), detached.

    Positions before the first real key get 0 (every key they see has zero features anyway).
    """
    s = key_scale.detach()
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    c = torch.cummax(s, dim=-1).values
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def trig_kernel(
    x: torch.Tensor,
    projection: torch.Tensor,
    is_query: bool,
    key_padding_mask: torch.Tensor | None = None,
    stabilizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Trigonometric random features for the softmax kernel (paper Sec. 2.3, eq. for SM^trig_m).

    phi(x) = exp(|x|^2/2) / sqrt(m) [sin(w^T x), cos(w^T x)] (m/2 directions, m features), so that
    E[phi(q)^T phi(k)] = exp(|q|^2/2 + |k|^2/2) E[cos(w^T(q-k))] = exp(q^T k). Not positive: kept
    for the comparison study only. The exp(|x|^2/2) factor is a per-row constant for queries
    (dropped: cancels in D^-1); for keys it is stabilized by one constant per (batch, head).
    """
    wx = torch.einsum("bhld,md->bhlm", x, projection)  # (b, h, l, m/2)
    ratio = wx.shape[-1] ** -0.5  # sin.sin + cos.cos = cos(w^T(q - k)), averaged over m/2 directions
    phi = ratio * torch.cat([torch.sin(wx), torch.cos(wx)], dim=-1)
    if is_query:
        return phi
    half_sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (b, h, l, 1)
    c = key_stabilizer(half_sq_norm, key_padding_mask) if stabilizer is None else stabilizer
    return _mask_keys(phi * torch.exp(half_sq_norm - c), key_padding_mask)


def relu_kernel(
    x: torch.Tensor,
    projection: torch.Tensor,
    is_query: bool,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Generalized (Performer-ReLU) features phi(x) = relu(W x) + eps (paper Sec. 2.2, f = ReLU).

    The kernel K(q, k) = phi(q)^T phi(k) is used as attention itself, not as an estimator of
    softmax. eps (released default 1e-3) keeps the denominator positive.
    """
    phi = F.relu(torch.einsum("bhld,md->bhlm", x, projection)) + eps
    return phi if is_query else _mask_keys(phi, key_padding_mask)


# --------------------------------------------------------------------------------------------
# attention from features
# --------------------------------------------------------------------------------------------
def _normalize(out_ext: torch.Tensor) -> torch.Tensor:
    """Split [numerator | denominator] and divide: D^-1 (...). A zero denominator (a query with
    no real key at all) gives a zero output instead of NaN."""
    num, den = out_ext[..., :-1], out_ext[..., -1:]
    den = torch.where(den == 0, torch.ones_like(den), den)
    return num / den


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """(b, h, l, d) -> (b, h, l, d + 1): V with a column of ones, so K'^T [V 1] = [K'^T V, K'^T 1]."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def linear_attention(q_prime: torch.Tensor, k_prime: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional FAVOR attention D^-1 (Q' ((K')^T V)), D = diag(Q' ((K')^T 1_L)) (paper eq. 5).

    q_prime, k_prime: (b, h, l, m); v: (b, h, l, d) -> (b, h, l, d). Time and memory O(L m d).
    """
    kv = torch.einsum("bhlm,bhle->bhme", k_prime, _with_ones(v))  # [K'^T V | K'^T 1]: (b, h, m, d+1)
    return _normalize(torch.einsum("bhlm,bhme->bhle", q_prime, kv))


def _chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(..., l, f) -> (B n, C, f): zero-padded at the end to n = ceil(l / C) chunks, B = batch x heads."""
    length, f = x.shape[-2:]
    pad = -length % chunk
    if pad:  # zero rows: as keys / values they add nothing, as queries their outputs are cut off
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(-1, chunk, f).contiguous()


def _unchunk(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B n, C, f) -> shape[:-1] + (f,), cutting the padding."""
    return x.reshape(*shape[:-2], -1, x.shape[-1])[..., : shape[-2], :]


def _exclusive_prefix(states: torch.Tensor, n: int, reverse: bool = False, decay: torch.Tensor | None = None) -> torch.Tensor:
    """(B n, m, e) chunk states -> for chunk t the sum over chunks s < t (s > t when ``reverse``).

    A matmul over the chunk axis with a strictly triangular (n, n) matrix of ones, or with the
    per-sequence weights ``decay`` (B, n, n), decay[t, s] for s < t (its transpose when reversed).
    """
    flat = states.reshape(-1, n, states.shape[-2] * states.shape[-1])  # (B, n, m e)
    if decay is None:
        tri = torch.ones(n, n, dtype=states.dtype, device=states.device)
        tri = tri.triu_(1) if reverse else tri.tril_(-1)  # tri[t, s] = 1 where chunk t sees chunk s
        return torch.matmul(tri, flat).reshape(states.shape)
    return torch.bmm(decay.transpose(1, 2) if reverse else decay, flat).reshape(states.shape)


def _scale(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(min(x, 0)) in place of x: every factor of the causal stabilizer is <= 1 where it matters;
    the clamp only touches entries that are masked out or multiply zero features, keeping them finite."""
    return log_ratio.clamp_(max=0.0).exp_()


class _ChunkScales:
    """The causal stabilizer exp(s_j - c_i) (key j, query i, c_i = max_{j' <= i} s_j') in chunks.

    For j in an earlier chunk s < t than i (chunk t), with M_t the running max at the end of chunk
    t, it factors into three numbers that are all <= 1:
        exp(s_j - c_i) = gamma_j * decay[t, s] * beta_i,
        gamma_j = exp(s_j - M_s),  decay[t, s] = exp(M_s - M_{t-1}),  beta_i = exp(M_{t-1} - c_i);
    inside a chunk the (C, C) block exp(s_j - c_i) (j <= i) is used as it is. So no factor can
    overflow however fast the stabilizer grows, unlike rescaling by exp(c_i) or exp(-c_i) alone.
    """

    def __init__(self, key_scale: torch.Tensor, query_scale: torch.Tensor, chunk: int):
        length = key_scale.shape[-1]
        pad = -length % chunk
        if pad:  # padded rows have zero features; any finite scale will do: the last running max
            fill = query_scale[..., -1:].expand(*query_scale.shape[:-1], pad)
            key_scale, query_scale = torch.cat([key_scale, fill], -1), torch.cat([query_scale, fill], -1)
        s = key_scale.reshape(-1, chunk)  # (B n, C)
        c = query_scale.reshape(-1, chunk)
        n = (length + pad) // chunk
        self.intra = _scale(s[:, None, :] - c[:, :, None])  # (B n, C, C): [i, j], used on tril blocks only
        last = c[:, -1].reshape(-1, n)  # M_t: (B, n)
        prev = torch.cat([last[:, :1], last[:, :-1]], dim=1)  # M_{t-1} (chunk 0 carries nothing)
        self.beta = _scale(prev.reshape(-1, 1) - c).unsqueeze(-1)  # (B n, C, 1)
        self.gamma = _scale(s - last.reshape(-1, 1)).unsqueeze(-1)  # (B n, C, 1)
        self.decay = _scale(last[:, None, :] - prev[:, :, None]).tril_(-1)  # (B, n, n): [t, s]


def _chunk_prefix(x: torch.Tensor, n: int, reverse: bool = False) -> torch.Tensor:
    """(B n, e) per-chunk sums -> for chunk t the sum over chunks s < t (s > t when ``reverse``), (B n, 1, e)."""
    x = x.reshape(-1, n, x.shape[-1])
    if reverse:
        x = x.flip(1)
    out = x.cumsum(1) - x
    if reverse:
        out = out.flip(1)
    return out.reshape(-1, 1, x.shape[-1])


class _CausalProduct(torch.autograd.Function):
    """O_i = sum_{j <= i} (a_i . b_j w_ij + f A_i) c_j in chunks of C rows, with a backward that
    rebuilds states.

    a, b: (..., l, m) (that is q', k'); c: (..., l, e) (that is [V 1]); A_i = sum_m a_i, f the eps
    floor of every key feature (0: none); w_ij = 1, or the causal stabilizer exp(s_j - c_i) when
    the per-key scales s and their running max c are given (``_ChunkScales``: w = intra inside a
    chunk, gamma_j decay[t, s] beta_i across chunks). Per chunk t:
        intra  P_t = tril(a_t b_t^T * W_t + f A_t 1^T) (C x C),  O_t  = P_t c_t
        inter  S_t = sum_{s < t} decay[t, s] b_s^T (gamma c)_s,   O_t += beta (a_t S_t) + f A_t E_t
    with E_t = sum_{s < t} 1^T c_s (the floor's state: a prefix sum of c, e numbers per chunk).
    Saved: a, b, c, the scales and the C x C blocks P (L x C numbers); the states S are rebuilt in
    backward. With G = dL/dO, H_t = tril(G_t c_t^T), R_t = sum_{s > t} decay[s, t] a_s^T (beta G)_s
    (suffix states, from the last chunk backwards) and F_t = sum_{s > t} A_s^T G_s:
        da_t = (H_t W_t) b_t   + (beta G_t) S_t^T       + f (rowsum H_t + G_t E_t^T) 1^T
        db_t = (H_t W_t)^T a_t + (gamma c_t) R_t^T
        dc_t = P_t^T G_t       + gamma (b_t R_t)        + f F_t
    Chunked tensors are (B n, C, f) with B = batch x heads, so every product is one batched
    matmul. Extra memory: 2 L C + 2 (L / C) m e; never L m e. No Python loop over tokens or chunks.
    The scales are constants (no gradient): the stabilizer is detached.
    """

    @staticmethod
    def forward(ctx, a, b, c, chunk, key_scale=None, query_scale=None, floor=0.0):
        n = math.ceil(a.shape[-2] / chunk)
        a_, b_, c_ = (_chunks(x, chunk) for x in (a, b, c))  # (B n, C, m), (B n, C, m), (B n, C, e)
        w = None if key_scale is None else _ChunkScales(key_scale, query_scale, chunk)
        scores = torch.bmm(a_, b_.transpose(1, 2))  # P: (B n, C, C)
        if w is not None:
            scores.mul_(w.intra)
        a_sum = a_.sum(dim=-1, keepdim=True) if floor else None  # A: (B n, C, 1)
        if floor:
            scores.add_(a_sum, alpha=floor)
        scores.tril_()
        out = torch.bmm(scores, c_)  # (B n, C, e)
        c_in = c_ if w is None else c_ * w.gamma
        carried = _exclusive_prefix(torch.bmm(b_.transpose(1, 2), c_in), n, decay=None if w is None else w.decay)
        if w is None:
            out.baddbmm_(a_, carried)
        else:
            out.addcmul_(torch.bmm(a_, carried), w.beta)
        del carried, c_in
        if floor:
            out.addcmul_(a_sum, _chunk_prefix(c_.sum(dim=1), n), value=floor)
        ctx.save_for_backward(a_, b_, c_, scores, *(() if w is None else (key_scale, query_scale)))
        ctx.n, ctx.chunk, ctx.floor = n, chunk, floor
        ctx.shapes = tuple(x.shape for x in (a, b, c))
        return _unchunk(out, c.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a_, b_, c_, scores, *scales = ctx.saved_tensors
        n, floor, (shape_a, shape_b, shape_c) = ctx.n, ctx.floor, ctx.shapes
        w = _ChunkScales(*scales, ctx.chunk) if scales else None
        decay = None if w is None else w.decay
        g_ = _chunks(grad_out, ctx.chunk)  # G: (B n, C, e)
        g_in = g_ if w is None else g_ * w.beta  # beta G
        da = db = dc = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            h = torch.bmm(g_, c_.transpose(1, 2)).tril_()  # H: (B n, C, C)
            if ctx.needs_input_grad[0] and floor:
                e_state = _chunk_prefix(c_.sum(dim=1), n)  # E: (B n, 1, e)
                da_floor = (h.sum(dim=-1, keepdim=True) + (g_ * e_state).sum(dim=-1, keepdim=True)).mul_(floor)
                del e_state
            if w is not None:
                h.mul_(w.intra)
            if ctx.needs_input_grad[0]:
                da = torch.bmm(h, b_)
                c_in = c_ if w is None else c_ * w.gamma
                carried = _exclusive_prefix(torch.bmm(b_.transpose(1, 2), c_in), n, decay=decay)  # S, rebuilt
                da.baddbmm_(g_in, carried.transpose(1, 2))
                del carried, c_in
                if floor:
                    da.add_(da_floor)
                da = _unchunk(da, shape_a)
            if ctx.needs_input_grad[1]:
                db = torch.bmm(h.transpose(1, 2), a_)
            del h
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            suffix = _exclusive_prefix(torch.bmm(a_.transpose(1, 2), g_in), n, reverse=True, decay=decay)  # R
            if ctx.needs_input_grad[1]:
                db.baddbmm_(c_ if w is None else c_ * w.gamma, suffix.transpose(1, 2))
                db = _unchunk(db, shape_b)
            if ctx.needs_input_grad[2]:
                dc = torch.bmm(scores.transpose(1, 2), g_)
                if w is None:
                    dc.baddbmm_(b_, suffix)
                else:
                    dc.addcmul_(torch.bmm(b_, suffix), w.gamma)
                if floor:  # F_t = sum over later chunks of A^T G
                    a_sum = a_.sum(dim=-1, keepdim=True)
                    dc.add_(_chunk_prefix((a_sum * g_).sum(dim=1), n, reverse=True), alpha=floor)
                dc = _unchunk(dc, shape_c)
        return da, db, dc, None, None, None, None


def causal_product(
    q_prime: torch.Tensor,
    k_prime: torch.Tensor,
    v: torch.Tensor,
    chunk: int = 128,
    key_scale: torch.Tensor | None = None,
    query_scale: torch.Tensor | None = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """Unnormalized causal FAVOR product O_i = q'_i^T S_i, S_i = sum_{j<=i} k'_j v_j^T (paper Sec. 2.6).

    With scales, the key features seen by query i are k'_j exp(key_scale_j - query_scale_i); with
    a floor f, every key feature gets + f on top (the eps floor, never scaled)."""
    if (key_scale is None) != (query_scale is None):
        raise ValueError("give both key_scale and query_scale, or neither")
    return _CausalProduct.apply(q_prime, k_prime, v, chunk, key_scale, query_scale, float(floor))


def causal_linear_attention(
    q_prime: torch.Tensor,
    k_prime: torch.Tensor,
    v: torch.Tensor,
    chunk: int = 128,
    key_scale: torch.Tensor | None = None,
    floor: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unidirectional FAVOR attention out_i = q'_i^T S_i / q'_i^T z_i (paper Sec. 2.6, prefix sums).

    S_i = sum_{j<=i} k'_j v_j^T (m x d), z_i = sum_{j<=i} k'_j. q_prime, k_prime: (b, h, l, m);
    v: (b, h, l, d) -> (b, h, l, d). Chunked; nothing of size L x m x d is allocated.

    With ``key_scale`` s (b, h, l) (from ``per_key_features``) the key features seen by query i
    are k'_j exp(s_j - c_i) + floor, c_i = ``causal_stabilizer(s)``: the stabilizer of position i
    depends on keys 0..i only. The floor (eps m^-1/2 for FAVOR+) is never scaled; padded keys
    (``key_padding_mask`` (b, l)) get no floor either (their features are zero already).
    """
    v_ext = _with_ones(v)
    if key_padding_mask is not None and floor:
        v_ext = v_ext.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    if key_scale is None:
        return _normalize(causal_product(q_prime, k_prime, v_ext, chunk, floor=floor))
    query_scale = causal_stabilizer(key_scale, key_padding_mask)
    return _normalize(causal_product(q_prime, k_prime, v_ext, chunk, key_scale.detach(), query_scale, floor))


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 stays float64 (for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _fp32(device_type: str):
    """Disable autocast so feature maps and sums stay float32."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


class FavorAttention(nn.Module):
    """FAVOR+ attention with the interface of ``attention.SoftmaxAttention``.

    Args:
        dim_head: d, the size of q, k, v per head.
        nb_features: m, the length of the feature vector phi(x) (hyperbolic and trigonometric
            kernels use m/2 directions, two features each; m must then be even).
        kernel: "softmax" (FAVOR+), "softmax_hyp" (hyperbolic positive features),
            "softmax_trig" (trigonometric, comparison only) or "relu" (Performer-ReLU).
        orthogonal: orthogonal random feature blocks (else iid Gaussian).
        causal: unidirectional attention (prefix sums).
        norm: "chi" (unbiased) or "sqrt_d" (regularized) row norms of W.
        eps: the feature floor; default 1e-6 for softmax kernels, 1e-3 for relu (unused by trig).
        chunk_size: C of the causal chunked prefix sums.
        seed: the seed of the initial draw; ``redraw(seed)`` draws again.

    The projection W is a registered buffer (in state_dict, broadcast by DDP); the module has no
    parameters, so an exact model's weights load into a FAVOR+ model with the same names.
    """

    def __init__(
        self,
        dim_head: int,
        nb_features: int = 256,
        kernel: str = "softmax",
        orthogonal: bool = True,
        causal: bool = False,
        *,
        norm: str = "chi",
        eps: float | None = None,
        chunk_size: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        paired = kernel in ("softmax_hyp", "softmax_trig")
        if paired and nb_features % 2:
            raise ValueError(f"kernel {kernel!r} needs an even nb_features, got {nb_features}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dim_head = dim_head
        self.nb_features = nb_features
        self.nb_directions = nb_features // 2 if paired else nb_features
        self.kernel = kernel
        self.orthogonal = orthogonal
        self.causal = causal
        self.norm = norm
        self.eps = (1e-3 if kernel == "relu" else 1e-6) if eps is None else float(eps)
        self.chunk_size = chunk_size
        self.seed = seed
        self.register_buffer("projection", self._draw(seed))

    def extra_repr(self) -> str:
        return (
            f"dim_head={self.dim_head}, nb_features={self.nb_features}, kernel={self.kernel!r}, "
            f"orthogonal={self.orthogonal}, causal={self.causal}, norm={self.norm!r}, eps={self.eps}"
        )

    def _draw(self, seed: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        return draw_projection(self.nb_directions, self.dim_head, generator, self.orthogonal, self.norm)

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw new random features from ``seed``: the same seed gives the same W everywhere."""
        self.projection.copy_(self._draw(seed).to(self.projection.device, self.projection.dtype))
        self.seed = int(seed)
        log.debug("FAVOR+ features redrawn with seed %d", seed)

    # ---------------------------------------------------------------------------- features
    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 4 or x.shape[-1] != self.dim_head:
            raise ValueError(f"{name} must be (batch, heads, length, {self.dim_head}), got {tuple(x.shape)}")

    def features(
        self,
        x: torch.Tensor,
        is_query: bool,
        key_padding_mask: torch.Tensor | None = None,
        stabilizer: torch.Tensor | None = None,
        eps: float | None = None,
    ) -> torch.Tensor:
        """phi(x d^-1/4), (b, h, l, m), float32 (float64 for float64 input) also under autocast;
        padded keys have all-zero features."""
        dtype = _compute_dtype(x)
        eps = self.eps if eps is None else eps
        with _fp32(x.device.type):
            x = x.to(dtype) * self.dim_head**-0.25
            w = self.projection.to(dtype)
            if self.kernel in ("softmax", "softmax_hyp"):
                return softmax_kernel(x, w, is_query, key_padding_mask, eps, self.kernel == "softmax_hyp", stabilizer)
            if self.kernel == "softmax_trig":
                return trig_kernel(x, w, is_query, key_padding_mask, stabilizer)
            return relu_kernel(x, w, is_query, key_padding_mask, eps)

    # ---------------------------------------------------------------------------- attention
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: (b, h, l, d) -> (b, h, l, d) in v's dtype; fp32 inside."""
        for name, x in (("q", q), ("k", k)):
            self._check(x, name)
        mask = check_key_padding_mask(key_padding_mask, k)
        out_dtype = v.dtype
        with _fp32(q.device.type):
            q_prime = self.features(q, True)
            if self.causal and self.kernel != "relu":
                k_prime, key_scale = self.causal_key_features(k, mask)
                out = causal_linear_attention(
                    q_prime, k_prime, v.to(q_prime.dtype), self.chunk_size, key_scale, self._floor(), mask
                )
            elif self.causal:  # relu features have no stabilizer: eps is part of them
                out = causal_linear_attention(q_prime, self.features(k, False, mask), v.to(q_prime.dtype), self.chunk_size)
            else:
                out = linear_attention(q_prime, self.features(k, False, mask), v.to(q_prime.dtype))
        return out.to(out_dtype)

    def causal_key_features(self, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax-kernel key features at each key's own scale and the scales s (``per_key_features``),
        float32 also under autocast: the key features seen by query i are phi_hat_j exp(s_j - c_i) + floor."""
        dtype = _compute_dtype(k)
        with _fp32(k.device.type):
            x = k.to(dtype) * self.dim_head**-0.25
            return per_key_features(x, self.projection.to(dtype), self.kernel, key_padding_mask)

    def _floor(self) -> float:
        """The eps floor of every key feature: ratio * eps for positive softmax features (ratio =
        m^-1/2), eps for relu (inside its features), none for trigonometric features."""
        if self.kernel == "softmax_trig":
            return 0.0
        if self.kernel in ("softmax", "softmax_hyp"):
            return self.eps * self.nb_features**-0.5
        return self.eps

    def attention_matrix(
        self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None, block_rows: int | None = None
    ) -> torch.Tensor:
        """The explicit approximate attention D^-1 Q' K'^T, (b, h, l, l) float32, rows sum to 1.

        Causally masked when causal; padded keys get weight 0. Built in blocks of ``block_rows``
        query rows (default: so that one block holds at most l x l numbers over all heads), so no
        temporary larger than one head's map exists. ``attention_matrix(q, k) @ v == forward(q, k, v)``.
        """
        for name, x in (("q", q), ("k", k)):
            self._check(x, name)
        mask = check_key_padding_mask(key_padding_mask, k)
        b, h, length, _ = q.shape
        if block_rows is None:
            block_rows = max(1, length // (b * h))
        with _fp32(q.device.type), torch.no_grad():
            q_prime = self.features(q, True)
            scaled = self.causal and self.kernel != "relu"  # per-query stabilizer, as in forward
            if scaled:
                k_prime, key_scale = self.causal_key_features(k, mask)
                query_scale = causal_stabilizer(key_scale, mask)
                floor = self._floor() * (1.0 if mask is None else (~mask)[:, None, None, :].to(q_prime.dtype))
            else:
                k_prime = self.features(k, False, mask)
            out = q_prime.new_empty(b, h, length, k.shape[2])
            for start in range(0, length, block_rows):
                stop = min(start + block_rows, length)
                q_block = q_prime[:, :, start:stop]
                block = torch.einsum("bhlm,bhkm->bhlk", q_block, k_prime)
                if scaled:  # k'_j exp(s_j - c_i) + floor
                    block.mul_(_scale(key_scale[:, :, None, :] - query_scale[:, :, start:stop, None]))
                    block.add_(q_block.sum(dim=-1, keepdim=True) * floor)
                if self.causal:
                    block = torch.tril(block, diagonal=start)
                den = block.sum(dim=-1, keepdim=True)
                out[:, :, start:stop] = block / torch.where(den == 0, torch.ones_like(den), den)
        return out

    # ---------------------------------------------------------------------------- recurrent
    def init_state(
        self, batch: int, heads: int, dim_v: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> dict:
        """An empty causal state: S (b, h, m, e) and z (b, h, m) at scale exp(-c), the running key
        stabilizer c (b, h, 1, 1), and for the eps floor the sum of v (b, h, e) and the key count."""
        device = self.projection.device if device is None else device
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return {
            "S": zeros(batch, heads, self.nb_features, dim_v),
            "z": zeros(batch, heads, self.nb_features),
            "c": torch.full((batch, heads, 1, 1), float("-inf"), device=device, dtype=dtype),
            "v_sum": zeros(batch, heads, dim_v),
            "count": zeros(batch, heads, 1),
        }

    def _running_stabilizer(self, k_scaled: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.kernel in ("softmax", "softmax_hyp"):
            logits = softmax_logits(k_scaled, self.projection.to(k_scaled.dtype), self.kernel == "softmax_hyp")
        elif self.kernel == "softmax_trig":
            logits = 0.5 * (k_scaled * k_scaled).sum(dim=-1, keepdim=True)
        else:
            return torch.zeros_like(c)
        return torch.maximum(c, logits.amax(dim=(-2, -1), keepdim=True))

    @torch.no_grad()
    def step(self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One causal step: q_t, k_t, v_t (b, h, 1, d) -> (out_t (b, h, 1, d), new state).

        out_t equals the last row of ``forward`` run (causally) on all tokens given so far: the key
        stabilizer is the running max, S and z are rescaled by exp(c_old - c_new) when it grows, and
        the eps floor of the key features (ratio * eps per feature) is added from sum(v) and the
        count, so it does not depend on the stabilizer's history.
        """
        if not self.causal:
            raise RuntimeError("step() is for causal attention; build FavorAttention(causal=True)")
        out_dtype = v_t.dtype
        with _fp32(q_t.device.type):
            dtype = state["S"].dtype
            v_t = v_t.to(dtype)
            k_scaled = k_t.to(dtype) * self.dim_head**-0.25
            c_new = self._running_stabilizer(k_scaled, state["c"])
            rescale = torch.exp(state["c"] - c_new)  # (b, h, 1, 1); exp(-inf) = 0 on the first step
            k_prime = self.features(k_t, False, stabilizer=c_new, eps=0.0)  # (b, h, 1, m)
            S = state["S"] * rescale + torch.einsum("bhlm,bhle->bhme", k_prime, v_t)
            z = state["z"] * rescale[..., 0] + k_prime[:, :, 0]
            v_sum = state["v_sum"] + v_t[:, :, 0]
            count = state["count"] + 1
            floor = self._floor()
            S_all = S + floor * v_sum.unsqueeze(2)  # every feature carries floor * sum(v)
            z_all = z + floor * count
            q_prime = self.features(q_t, True)[:, :, 0]  # (b, h, m)
            num = torch.einsum("bhm,bhme->bhe", q_prime, S_all)
            den = torch.einsum("bhm,bhm->bh", q_prime, z_all).unsqueeze(-1)
            out = num / torch.where(den == 0, torch.ones_like(den), den)
        new_state = {"S": S, "z": z, "c": c_new, "v_sum": v_sum, "count": count}
        return out.unsqueeze(2).to(out_dtype), new_state
