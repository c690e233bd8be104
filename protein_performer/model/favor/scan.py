"""Memory-lean FAVOR+ (the CPU path): features fused into a scan over chunks, recomputed in backward.

``favor_scan(xq, xk, v, features, ...)`` computes the whole attention, feature maps included, in one
autograd Function that walks the sequence in chunks of C positions with every (batch, head) of
the chunk batched together. Every temporary is a (B, C, m) or (B, C, C) block (B = batch x
heads), a few MiB, so nothing large is allocated and freed per call: glibc keeps such blocks in
its heap, which makes the speed independent of malloc tuning, and they stay in cache. The causal
scan goes block by block (a block = K chunks, R = K C rows, about 4 MiB of features; inside a
block the chunks are batched as in ``causal.py``) carrying the state from block to block.
Saved for backward: xq, xk, [v 1] (L x (d + 1) each), the output and its denominator, and for
causal attention the state entering each block ((L / R) m e numbers, e / R of one L x m map);
no L x m feature tensor. Backward recomputes the features block by block, in reverse.

Same numbers as ``features`` + ``causal`` (to float rounding), same stabilizer semantics; the
features a and b and their chain rule are ``FeatureMap.fused_*``:
- queries: a_i = r (exp(w^T x_i - max_m w^T x_i) + eps), r = m^-1/2 (relu: relu(w^T x) + eps);
- causal keys: b_j = r exp(w^T x_j - |x_j|^2/2 - s_j), s_j the max over features; key j is seen
  by query i as b_j exp(s_j - c_i) + f with c_i = max_{j' <= i} s_j' and the floor f = r eps.
  Across chunks the state S = sum_j b_j exp(s_j - M) [v_j 1]^T is kept at the scale M of the
  running max at the end of the previous chunk, and rescaled by exp(M - M') <= 1 when it grows:
  no factor exceeds 1, nothing overflows (like ``causal._ChunkScales``).
- bidirectional keys: the same online rescaling over key chunks ends at the scale of the global
  max c (``features.key_stabilizer``), so K'^T [V 1] = sum_j b_j exp(s_j - c) [v_j 1]^T + f 1 sum_j [v_j 1]^T.
Padded keys get zero features and no floor. Written with plain tensor ops: runs on any device,
but on CUDA every block costs a few dozen kernel launches (``causal.py`` is the CUDA default).

Backward, with G = dL/d[num | den] (from the normalisation) and per chunk the intra block
W_ij = exp(s_j - c_i), H = tril(G [V 1]^T), beta_i = exp(M - c_i), gamma_j = exp(s_j - M_t):
    da = (H * W) b + beta G S^T + f (rowsum H + G E^T)          (forward scan, S and E rebuilt)
    db = (H * W)^T a + gamma [V 1] R^T,   d[V 1] = P^T G + gamma b R + f F   (reverse scan)
with R = sum_{i later} a_i exp(M_t - c_i) G_i^T, F = sum_{i later} A_i G_i; then the feature maps'
own chain rule: dx = (da * (a - f)) W for queries, dx = (db * b) W - x rowsum(db * b) for keys.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from protein_performer.model.favor.features import FeatureMap


def _safe(x: torch.Tensor) -> torch.Tensor:
    """-inf (no real key yet) -> 0, as ``causal_stabilizer`` and ``key_stabilizer`` do."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _exp_le1(x: torch.Tensor) -> torch.Tensor:
    """exp(min(x, 0)) in place: the stabilizer's factors are <= 1 where they multiply real
    features; the clamp only touches factors of zero features (padding), keeping them finite."""
    return x.clamp_(max=0.0).exp_()


def _spans(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


class _Grad:
    """dL/d[num | den] of rows lo:hi (``g[lo:hi]``), from dL/d(num / den), block by block."""

    def __init__(self, grad: torch.Tensor, out: torch.Tensor, den: torch.Tensor):
        self.grad, self.out, self.den = grad, out, den

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return _grad_ext(self.grad[:, rows], self.out[:, rows], self.den[:, rows])


def _grad_ext(grad: torch.Tensor, out: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """dL/d[num | den] from dL/d(num / den); rows with den == 0 (no real key) divided by 1."""
    zero = den == 0
    den = torch.where(zero, torch.ones_like(den), den)
    g_num = grad / den
    g_den = torch.where(zero, torch.zeros_like(den), -(g_num * out).sum(dim=-1, keepdim=True))
    return torch.cat([g_num, g_den], dim=-1)


def _finish(o_ext: torch.Tensor, out: torch.Tensor, den: torch.Tensor, lo: int, hi: int) -> None:
    """Rows lo:hi of the output (num / den) and of den from one block's [num | den] (B, hi - lo, e):
    normalized block by block, so that no (B, L, e) temporary is made."""
    d = o_ext[..., -1:]
    den[:, lo:hi] = d
    torch.div(o_ext[..., :-1], torch.where(d == 0, torch.ones_like(d), d), out=out[:, lo:hi])


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xq, xk, v, w, mask, fm, causal, chunk):
        v_ext = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, L, e)
        if mask is not None:
            v_ext.masked_fill_(mask.unsqueeze(-1), 0.0)
        run = _causal_forward if causal else _bidirectional_forward
        out, den, *extra = run(fm, w, xq, xk, v_ext, mask, chunk)
        ctx.save_for_backward(xq, xk, v_ext, w, out, den, *((mask,) if mask is not None else ()), *extra)
        ctx.fm, ctx.causal, ctx.chunk, ctx.has_mask = fm, causal, chunk, mask is not None
        ctx.mark_non_differentiable(den)
        return out, den

    @staticmethod
    def backward(ctx, grad_out, _grad_den):
        xq, xk, v_ext, w, out, den, *rest = ctx.saved_tensors
        mask = rest.pop(0) if ctx.has_mask else None
        fm = ctx.fm
        g = _Grad(grad_out, out, den)
        run = _causal_backward if ctx.causal else _bidirectional_backward
        dxq, dxk, dv = run(fm, w, xq, xk, v_ext, mask, g, ctx.chunk, *rest)
        return dxq, dxk, dv, None, None, None, None, None


# ------------------------------------------------------------------------------ causal
BLOCK_ELEMENTS = (
    1 << 20
)  # numbers in one (B, R, m) block: 4 MiB in float32 (measured: 2^20 0.29x SDPA at L 8192 causal, 2^19 0.29-0.31x, 2^18 0.35x)


def _block_rows(batch: int, m: int, chunk: int, length: int) -> int:
    """R: a multiple of the chunk, so that a (B, R, m) block holds about BLOCK_ELEMENTS numbers:
    small enough for glibc to recycle (below its mmap threshold), large enough that every op is
    worth a parallel region."""
    k = max(1, BLOCK_ELEMENTS // (batch * m * chunk))
    return min(k * chunk, math.ceil(length / chunk) * chunk)


class _Block:
    """One block of K chunks of C rows: features, stabilizer factors, chunk-state weights.

    Scales: P = [M_in, M_0, ..., M_{K-1}] (B, K + 1), M_t the running max c at the end of chunk t
    and M_in the scale of the incoming state. The state before chunk t is kept at scale P_t, so
    the states follow the recurrence S_{t+1} = r_t S_t + U_t with ``ratio`` r_t = exp(P_t - P_{t+1})
    <= 1 (B, K) and U_t chunk t's own state at scale P_{t+1}; the reverse states likewise
    R_t = V_t + r_t R_{t+1}. The recurrences run chunk by chunk on (B, m e) slices that stay in
    cache (a (K + 1) x K decay matrix applied by bmm streams every state through memory twice).
    """

    def __init__(self, fm, w, xq, xk, v_ext, mask, run_max, M_in, chunk, need_query=True):
        B, R, e = v_ext.shape
        C = min(chunk, R)
        K = R // C
        self.B, self.K, self.C = B, K, C
        self.softmax = fm.kind != "relu"
        self.a = fm.fused_query(xq, w).view(B * K, C, -1) if need_query else None
        b, s = fm.fused_key(xk, w, mask)
        self.b, self.s = b.view(B * K, C, -1), s
        self.v = v_ext.reshape(B * K, C, e)
        if not self.softmax:
            self.run_max = run_max
            return
        s_real = s if mask is None else s.masked_fill(mask, float("-inf"))
        running = torch.maximum(torch.cummax(s_real, dim=1).values, run_max)
        self.run_max = running[:, -1:]
        c = _safe(running)  # (B, R)
        last = c.view(B, K, C)[:, :, -1]  # M_t: (B, K)
        P = torch.cat([M_in, last], dim=1)  # (B, K + 1)
        self.P = P
        s_ = s.view(B * K, 1, C)
        c_ = c.view(B * K, C, 1)
        self.W = _exp_le1(s_ - c_)  # (B K, C, C): [i, j] exp(s_j - c_i)
        self.beta = _exp_le1(P[:, :K].reshape(B * K, 1, 1) - c_)  # exp(P_t - c_i)
        self.gamma = _exp_le1(s_.transpose(1, 2) - last.reshape(B * K, 1, 1))  # exp(s_j - M_t)
        self.ratio = _exp_le1(P[:, :K] - P[:, 1:]).unsqueeze(-1)  # r_t = exp(P_t - P_{t+1}): (B, K, 1)

    def states(self, S_in, E_in):
        """(S_t for t = 0..K-1 (B K, m, e), the outgoing state S_K (B, m, e), E_t (B, K + 1, 1, e))."""
        B, K = self.B, self.K
        b = self.b if not self.softmax else self.b * self.gamma
        U = torch.bmm(b.transpose(1, 2), self.v)  # chunk states (B K, m, e)
        m, e = U.shape[-2:]
        S, S_out = _prefix_states(U.view(B, K, m * e), S_in.reshape(B, m * e), self.ratio if self.softmax else None)
        sums = self.v.sum(dim=1).view(B, K, e)
        E = torch.cat([torch.zeros_like(sums[:, :1]), sums.cumsum(dim=1)], dim=1).add_(E_in).unsqueeze(2)
        return S.view(B * K, m, e), S_out.view(B, m, e), E

    def reverse_states(self, V, rev):
        """From the chunks' own reverse states V_t (B K, m, e): R_t for t = 1..K (B K, m, e; R_K = ``rev``)
        and R_0 (B, m, e), the reverse state before the block."""
        B, K = self.B, self.K
        m, e = V.shape[-2:]
        R, R_0 = _suffix_states(V.view(B, K, m * e), rev.reshape(B, m * e), self.ratio if self.softmax else None)
        return R.view(B * K, m, e), R_0.view(B, m, e)


def _step(own: torch.Tensor, carry: torch.Tensor, ratio: torch.Tensor | None, out=None) -> torch.Tensor:
    """own + r carry (own + carry without ``ratio``), into ``out`` when given."""
    if ratio is None:
        return torch.add(own, carry, out=out)
    return torch.addcmul(own, carry, ratio, out=out)


def _prefix_states(
    U: torch.Tensor, S_in: torch.Tensor, ratio: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """U (B, K, n) [U_0..U_{K-1}] -> (S (B, K, n) [S_0..S_{K-1}], S_K): S_0 = S_in, S_{t+1} = r_t S_t + U_t
    (r_t = 1 without ``ratio`` (B, K, 1))."""
    K = U.shape[1]
    S = torch.empty_like(U)
    S[:, 0].copy_(S_in)
    for t in range(K - 1):
        _step(U[:, t], S[:, t], None if ratio is None else ratio[:, t], out=S[:, t + 1])
    return S, _step(U[:, K - 1], S[:, K - 1], None if ratio is None else ratio[:, K - 1])


def _suffix_states(V: torch.Tensor, rev: torch.Tensor, ratio: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """V (B, K, n) [V_0..V_{K-1}] -> (R (B, K, n) [R_1..R_K], R_0): R_K = ``rev``, R_t = V_t + r_t R_{t+1}."""
    K = V.shape[1]
    R = torch.empty_like(V)
    R[:, K - 1].copy_(rev)
    for t in range(K - 1, 0, -1):
        _step(V[:, t], R[:, t], None if ratio is None else ratio[:, t], out=R[:, t - 1])
    return R, _step(V[:, 0], R[:, 0], None if ratio is None else ratio[:, 0])


def _causal_forward(fm, w, xq, xk, v_ext, mask, chunk):
    B, L, e = v_ext.shape
    m, f, softmax = w.shape[0], fm.fused_floor(), fm.kind != "relu"
    rows = _block_rows(B, m, chunk, L)
    out, den = xq.new_empty(B, L, e - 1), xq.new_empty(B, L, 1)
    S = xq.new_zeros(B, m, e)  # sum_j b_j exp(s_j - M) [v_j 1]^T at scale M
    E = xq.new_zeros(B, 1, e)  # sum_j [v_j 1] (the floor's state)
    run_max = xq.new_full((B, 1), float("-inf"))  # running max of real keys' s
    M = xq.new_zeros(B, 1)  # c at the end of the previous block (0 before any key)
    saved_S, saved_small = [], []
    for lo, hi in _spans(L, rows):
        n = hi - lo
        pad = -n % min(chunk, n)
        saved_S.append(S)
        saved_small.append(torch.cat([E[:, 0], M, run_max], dim=1))
        xq_b, xk_b, v_b, mask_b = _padded(xq, xk, v_ext, mask, lo, hi, pad)
        blk = _Block(fm, w, xq_b, xk_b, v_b, mask_b, run_max, M, chunk)
        S_t, S_next, Es = blk.states(S, E)
        K, C = blk.K, blk.C
        scores = torch.bmm(blk.a, blk.b.transpose(1, 2))  # (B K, C, C)
        if softmax:
            a_sum = blk.a.sum(dim=-1, keepdim=True)
            scores.mul_(blk.W).add_(a_sum, alpha=f)
            o = torch.bmm(scores.tril_(), blk.v)
            o.addcmul_(torch.bmm(blk.a, S_t), blk.beta)
            o.addcmul_(a_sum, Es[:, :K].reshape(B * K, 1, e), value=f)
            M = blk.P[:, -1:]
        else:
            o = torch.bmm(scores.tril_(), blk.v).baddbmm_(blk.a, S_t)
        run_max = blk.run_max
        S, E = S_next, Es[:, K]
        _finish(o.view(B, K * C, e)[:, :n], out, den, lo, hi)
    return out, den, torch.stack(saved_S), torch.stack(saved_small)


def _padded(xq, xk, v_ext, mask, lo, hi, pad):
    """Rows lo:hi, zero-padded at the end to whole chunks (padded keys: masked, zero v)."""
    parts = [xq[:, lo:hi], xk[:, lo:hi], v_ext[:, lo:hi]]
    if not pad:
        return (*parts, None if mask is None else mask[:, lo:hi])
    parts = [torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in parts]
    m = (
        mask[:, lo:hi]
        if mask is not None
        else torch.zeros(parts[0].shape[0], hi - lo, dtype=torch.bool, device=xq.device)
    )
    return (*parts, torch.nn.functional.pad(m, (0, pad), value=True))


def _causal_backward(fm, w, xq, xk, v_ext, mask, g, chunk, saved_S, saved_small):
    """Reverse pass over blocks; the incoming state of every block was saved by the forward pass
    ((L / R) x m x e numbers: e / R of one L x m feature map)."""
    B, L, e = v_ext.shape
    m, f, softmax = w.shape[0], fm.fused_floor(), fm.kind != "relu"
    rows = _block_rows(B, m, chunk, L)
    spans = _spans(L, rows)
    dxq, dxk, dv = torch.empty_like(xq), torch.empty_like(xk), xq.new_empty(B, L, e - 1)
    rev = xq.new_zeros(B, m, e)  # R: sum over later queries a_i exp(M - c_i) G_i^T, at the block's last scale
    g_sum = xq.new_zeros(B, 1, e)  # F: sum over later queries A_i G_i
    for idx in range(len(spans) - 1, -1, -1):
        lo, hi = spans[idx]
        n = hi - lo
        pad = -n % min(chunk, n)
        S, small = saved_S[idx], saved_small[idx]
        E, M, run_max = small[:, None, :e], small[:, e : e + 1], small[:, e + 1 :]
        xq_b, xk_b, v_b, mask_b = _padded(xq, xk, v_ext, mask, lo, hi, pad)
        g_b = g[lo:hi] if not pad else torch.nn.functional.pad(g[lo:hi], (0, 0, 0, pad))
        blk = _Block(fm, w, xq_b, xk_b, v_b, mask_b, run_max, M, chunk)
        K, C = blk.K, blk.C
        S_t, _, Es = blk.states(S, E)
        E_t = Es[:, :K].reshape(B * K, 1, e)
        a, b, vc = blk.a, blk.b, blk.v
        gc = g_b.reshape(B * K, C, e)
        h = torch.bmm(gc, vc.transpose(1, 2)).tril_()  # H: (B K, C, C)
        scores = torch.bmm(a, b.transpose(1, 2))
        if softmax:
            a_sum = a.sum(dim=-1, keepdim=True)
            # reverse states R_t (scale P_t) for t = 1..K, and R_0 before the block (scale M_in)
            R_t, rev = blk.reverse_states(torch.bmm((a * blk.beta).transpose(1, 2), gc), rev)
            AG = (a_sum * gc).sum(dim=1).view(B, K, e)
            Fs = AG.flip(1).cumsum(1).flip(1)  # sum over chunks >= t
            F_t = torch.cat([Fs[:, 1:], torch.zeros_like(Fs[:, :1])], dim=1).add_(g_sum).view(B * K, 1, e)
            da_floor = (h.sum(dim=-1, keepdim=True) + (gc * E_t).sum(dim=-1, keepdim=True)).mul_(f)
            h.mul_(blk.W)
            scores.mul_(blk.W).add_(a_sum, alpha=f)
            da = torch.bmm(h, b).add_(da_floor).addcmul_(torch.bmm(gc, S_t.transpose(1, 2)), blk.beta)
            db = torch.bmm(h.transpose(1, 2), a).addcmul_(torch.bmm(vc, R_t.transpose(1, 2)), blk.gamma)
            dvc = torch.bmm(scores.tril_().transpose(1, 2), gc)
            dvc.addcmul_(torch.bmm(b, R_t), blk.gamma).add_(F_t, alpha=f)
            g_sum = g_sum + Fs[:, :1]
        else:
            R_t, rev = blk.reverse_states(torch.bmm(a.transpose(1, 2), gc), rev)
            da = torch.bmm(h, b).baddbmm_(gc, S_t.transpose(1, 2))
            db = torch.bmm(h.transpose(1, 2), a).baddbmm_(vc, R_t.transpose(1, 2))
            dvc = torch.bmm(scores.tril_().transpose(1, 2), gc).baddbmm_(b, R_t)
        del R_t, S_t, scores, h
        dv[:, lo:hi] = dvc.view(B, K * C, e)[:, :n, :-1]
        dxq[:, lo:hi] = fm.fused_query_grad(xq_b, w, a.view(B, K * C, m), da.view(B, K * C, m))[:, :n]
        dxk[:, lo:hi] = fm.fused_key_grad(xk_b, w, b.view(B, K * C, m), db.view(B, K * C, m))[:, :n]
    return dxq, dxk, _v_grad(dv, mask)


def _v_grad(dv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return dv if mask is None else dv.masked_fill_(mask.unsqueeze(-1), 0.0)


# ------------------------------------------------------------------------------ bidirectional
def _bidirectional_forward(fm, w, xq, xk, v_ext, mask, chunk):
    B, L, e = v_ext.shape
    m, softmax = w.shape[0], fm.kind != "relu"
    rows = _block_rows(B, m, chunk, L)
    kv = xq.new_zeros(B, m, e)  # K'^T [V 1] without the floor, at scale M (online max over key chunks)
    run_max = xq.new_full((B, 1), float("-inf"))
    M = xq.new_zeros(B, 1)
    for lo, hi in _spans(L, rows):
        b, s = fm.fused_key(xk[:, lo:hi], w, None if mask is None else mask[:, lo:hi])
        vc = v_ext[:, lo:hi]
        if softmax:
            s_real = s if mask is None else s.masked_fill(mask[:, lo:hi], float("-inf"))
            run_max = torch.maximum(run_max, s_real.amax(dim=1, keepdim=True))
            M_new = _safe(run_max)
            kv.mul_(_exp_le1((M - M_new).unsqueeze(-1)))
            b.mul_(_exp_le1(s - M_new).unsqueeze(-1))
            M = M_new
        kv.baddbmm_(b.transpose(1, 2), vc)
    kv_full = kv.add_(v_ext.sum(dim=1, keepdim=True), alpha=fm.fused_floor()) if softmax else kv
    out, den = xq.new_empty(B, L, e - 1), xq.new_empty(B, L, 1)
    for lo, hi in _spans(L, rows):
        _finish(torch.bmm(fm.fused_query(xq[:, lo:hi], w), kv_full), out, den, lo, hi)
    return out, den, kv_full, M


def _bidirectional_backward(fm, w, xq, xk, v_ext, mask, g, chunk, kv_full, M):
    B, L, e = v_ext.shape
    m = w.shape[0]
    rows = _block_rows(B, m, chunk, L)
    dxq, dxk, dv = torch.empty_like(xq), torch.empty_like(xk), xq.new_empty(B, L, e - 1)
    dkv = xq.new_zeros(B, m, e)  # d(K'^T [V 1]) = sum_i a_i G_i^T
    kv_t = kv_full.transpose(1, 2)
    for lo, hi in _spans(L, rows):
        x_q, gc = xq[:, lo:hi], g[lo:hi]
        a = fm.fused_query(x_q, w)
        dkv.baddbmm_(a.transpose(1, 2), gc)
        dxq[:, lo:hi] = fm.fused_query_grad(x_q, w, a, torch.bmm(gc, kv_t))
    floor_row = dkv.sum(dim=1, keepdim=True).mul_(fm.fused_floor())  # (B, 1, e): the floor's part of d[V 1]
    for lo, hi in _spans(L, rows):
        x_k, vc = xk[:, lo:hi], v_ext[:, lo:hi]
        b, s = fm.fused_key(x_k, w, None if mask is None else mask[:, lo:hi])
        if fm.kind != "relu":
            b.mul_(_exp_le1(s - M).unsqueeze(-1))  # b exp(s - c): the features without the floor
        dv[:, lo:hi] = torch.baddbmm(floor_row[..., :-1], b, dkv[..., :-1])
        dxk[:, lo:hi] = fm.fused_key_grad(x_k, w, b, torch.bmm(vc, dkv.transpose(1, 2)))
    return dxq, dxk, _v_grad(dv, mask)


# ------------------------------------------------------------------------------ entry
def favor_scan(
    xq: torch.Tensor,
    xk: torch.Tensor,
    v: torch.Tensor,
    features: FeatureMap,
    causal: bool,
    chunk: int = 128,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAVOR+ attention from scaled inputs: xq = q d^-1/4, xk = k d^-1/4, v, all (b, h, l, d) in the
    compute dtype, with the feature map ``features`` (a kernel in ``FUSED_KINDS``: positive softmax
    features, floor r eps, or relu(w^T x) + eps). Returns (b, h, l, d). The gradient flows to xq,
    xk and v (not to W: a buffer)."""
    b, h, length, d = xq.shape
    flat = lambda x: x.reshape(b * h, length, x.shape[-1])  # noqa: E731
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, :].expand(b, h, length).reshape(b * h, length)
    w = features.directions(xq.dtype).detach()
    out, _ = _Scan.apply(flat(xq), flat(xk), flat(v), w, mask, features, causal, int(chunk))
    return out.reshape(b, h, length, v.shape[-1])
