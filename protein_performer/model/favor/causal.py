"""Attention from features with autograd: bidirectional D^-1 Q'(K'^T V) and the chunked causal product.

All chunks of all heads are batched into a few large matmuls (no Python loop over chunks), so this
path suits devices where every kernel launch costs (CUDA without Triton); it keeps the L x m
features for backward. ``scan.py`` is the memory-lean path used on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from protein_performer.model.favor.features import causal_stabilizer


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


def _exclusive_prefix(
    states: torch.Tensor, n: int, reverse: bool = False, decay: torch.Tensor | None = None
) -> torch.Tensor:
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
    """O_i = sum_{j <= i} (q'_i . k'_j w_ij + f A_i) u_j in chunks of C rows, with a backward that
    rebuilds states.

    qf, kf: (..., l, m) query and key features q', k'; vx: (..., l, e) the values with a column of
    ones u = [v 1]; A_i = sum_m q'_i, f the eps floor of every key feature (0: none); w_ij = 1, or
    the causal stabilizer exp(s_j - c_i) when the per-key scales s and their running max c are given
    (``_ChunkScales``: w = intra inside a chunk, gamma_j decay[t, s] beta_i across chunks). Per chunk t:
        intra  P_t = tril(q'_t k'_t^T * W_t + f A_t 1^T) (C x C),  O_t  = P_t u_t
        inter  S_t = sum_{s < t} decay[t, s] k'_s^T (gamma u)_s,   O_t += beta (q'_t S_t) + f A_t E_t
    with E_t = sum_{s < t} 1^T u_s (the floor's state: a prefix sum of u, e numbers per chunk).
    Saved: q', k', u, the scales and the C x C blocks P (L x C numbers); the states S are rebuilt in
    backward. With G = dL/dO, H_t = tril(G_t u_t^T), R_t = sum_{s > t} decay[s, t] q'_s^T (beta G)_s
    (suffix states, from the last chunk backwards) and F_t = sum_{s > t} A_s^T G_s:
        dq'_t = (H_t W_t) k'_t   + (beta G_t) S_t^T       + f (rowsum H_t + G_t E_t^T) 1^T
        dk'_t = (H_t W_t)^T q'_t + (gamma u_t) R_t^T
        du_t  = P_t^T G_t        + gamma (k'_t R_t)       + f F_t
    Chunked tensors are (B n, C, f) with B = batch x heads, so every product is one batched
    matmul. Extra memory: 2 L C + 2 (L / C) m e; never L m e. No Python loop over tokens or chunks.
    The scales are constants (no gradient): the stabilizer is detached.
    """

    @staticmethod
    def forward(ctx, qf, kf, vx, chunk, key_scale=None, query_scale=None, floor=0.0):
        n = math.ceil(qf.shape[-2] / chunk)
        qf_, kf_, vx_ = (_chunks(x, chunk) for x in (qf, kf, vx))  # (B n, C, m), (B n, C, m), (B n, C, e)
        w = None if key_scale is None else _ChunkScales(key_scale, query_scale, chunk)
        scores = torch.bmm(qf_, kf_.transpose(1, 2))  # P: (B n, C, C)
        if w is not None:
            scores.mul_(w.intra)
        qf_sum = qf_.sum(dim=-1, keepdim=True) if floor else None  # A: (B n, C, 1)
        if floor:
            scores.add_(qf_sum, alpha=floor)
        scores.tril_()
        out = torch.bmm(scores, vx_)  # (B n, C, e)
        vx_in = vx_ if w is None else vx_ * w.gamma
        carried = _exclusive_prefix(torch.bmm(kf_.transpose(1, 2), vx_in), n, decay=None if w is None else w.decay)
        if w is None:
            out.baddbmm_(qf_, carried)
        else:
            out.addcmul_(torch.bmm(qf_, carried), w.beta)
        del carried, vx_in
        if floor:
            out.addcmul_(qf_sum, _chunk_prefix(vx_.sum(dim=1), n), value=floor)
        ctx.save_for_backward(qf_, kf_, vx_, scores, *(() if w is None else (key_scale, query_scale)))
        ctx.n, ctx.chunk, ctx.floor = n, chunk, floor
        ctx.shapes = tuple(x.shape for x in (qf, kf, vx))
        return _unchunk(out, vx.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qf_, kf_, vx_, scores, *scales = ctx.saved_tensors
        n, floor, (shape_qf, shape_kf, shape_vx) = ctx.n, ctx.floor, ctx.shapes
        w = _ChunkScales(*scales, ctx.chunk) if scales else None
        decay = None if w is None else w.decay
        g_ = _chunks(grad_out, ctx.chunk)  # G: (B n, C, e)
        g_in = g_ if w is None else g_ * w.beta  # beta G
        d_qf = d_kf = d_vx = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            h = torch.bmm(g_, vx_.transpose(1, 2)).tril_()  # H: (B n, C, C)
            if ctx.needs_input_grad[0] and floor:
                e_state = _chunk_prefix(vx_.sum(dim=1), n)  # E: (B n, 1, e)
                d_qf_floor = (h.sum(dim=-1, keepdim=True) + (g_ * e_state).sum(dim=-1, keepdim=True)).mul_(floor)
                del e_state
            if w is not None:
                h.mul_(w.intra)
            if ctx.needs_input_grad[0]:
                d_qf = torch.bmm(h, kf_)
                vx_in = vx_ if w is None else vx_ * w.gamma
                carried = _exclusive_prefix(torch.bmm(kf_.transpose(1, 2), vx_in), n, decay=decay)  # S, rebuilt
                d_qf.baddbmm_(g_in, carried.transpose(1, 2))
                del carried, vx_in
                if floor:
                    d_qf.add_(d_qf_floor)
                d_qf = _unchunk(d_qf, shape_qf)
            if ctx.needs_input_grad[1]:
                d_kf = torch.bmm(h.transpose(1, 2), qf_)
            del h
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            suffix = _exclusive_prefix(torch.bmm(qf_.transpose(1, 2), g_in), n, reverse=True, decay=decay)  # R
            if ctx.needs_input_grad[1]:
                d_kf.baddbmm_(vx_ if w is None else vx_ * w.gamma, suffix.transpose(1, 2))
                d_kf = _unchunk(d_kf, shape_kf)
            if ctx.needs_input_grad[2]:
                d_vx = torch.bmm(scores.transpose(1, 2), g_)
                if w is None:
                    d_vx.baddbmm_(kf_, suffix)
                else:
                    d_vx.addcmul_(torch.bmm(kf_, suffix), w.gamma)
                if floor:  # F_t = sum over later chunks of A^T G
                    qf_sum = qf_.sum(dim=-1, keepdim=True)
                    d_vx.add_(_chunk_prefix((qf_sum * g_).sum(dim=1), n, reverse=True), alpha=floor)
                d_vx = _unchunk(d_vx, shape_vx)
        return d_qf, d_kf, d_vx, None, None, None, None


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
