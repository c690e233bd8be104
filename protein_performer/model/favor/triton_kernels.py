"""FAVOR+ attention in Triton (the CUDA path): feature maps fused into chunked kernels.

``favor_triton(xq, xk, v, w, kind, causal, eps, chunk, key_padding_mask)`` has the signature and
the numbers of ``scan.favor_scan`` (same stabilizer semantics, to float32 rounding; nothing is
changed, the eps floor included), for ``kind == "softmax"`` (positive features; hyperbolic
features pass w = [W, -W]) and ``kind == "relu"`` (relu(w^T x) + eps, no stabilizer). No L x m
feature tensor ever exists in memory: every kernel recomputes the features of its rows from x and
W (x: (B, L, d), W: (m, d)). Saved for backward: xq, xk, [v 1], the output, its denominator, the
query feature sums A and the padding mask (O(L d)), plus (B, L) vectors (query max, key max,
running max); the chunk states are rebuilt in backward. Transient memory: one (B, n, m, d + 1)
float32 buffer of chunk states in forward, two in backward (L m (d + 1) / C numbers each: for
C = 64, d = 64 about one L x m float32 map), and for bidirectional attention up to PARTS partial
m x (d + 1) sums.

Kernels (B = batch x heads, n = ceil(L / C) chunks of C rows, E = d_v + 1; the last column of [v 1],
of the states and of dL/d[num | den] is handled as a vector, so tiles are d_v wide (powers of 2)):
    _rowmax     q_max_i = max_m w_m^T xq_i, s_j = max_m (w_m^T xk_j - |xk_j|^2 / 2)     grid (B, L / BL)
    _states     U_p = sum_{j in rows p} r exp(w^T xk_j - |xk_j|^2/2 - M_p) [v_j 1]^T   grid (B, P, m / BM)
    _scan       exclusive prefix (or suffix) of U over chunks with the rescaling
                exp(P_t - P_{t+1}) <= 1 between scales, in place                       grid (B, m E / BX)
    _forward    per chunk: a = r exp(w^T xq - q_max) + f; intra tril((a b^T) * W + f A) [v 1]
                plus beta a S_t + f A E_t                                              grid (B, n)
    _rstates    V_p = sum_{i in rows p} a_i beta_i G_i^T                              grid (B, P, m / BM)
    _backward   per chunk: d xq, d xk through the feature maps, d v                     grid (B, n)
with the causal notation of ``causal._CausalProduct`` and ``scan.py``: key j seen by query i as
b_j exp(s_j - c_i) + f, b_j = r exp(w^T x_j - |x_j|^2/2 - s_j), c_i = max_{j' <= i, real} s_j',
f = r eps, r = m^-1/2; M_t = c at the end of chunk t, beta_i = exp(M_{t-1} - c_i),
gamma_j = exp(s_j - M_t), W_ij = exp(s_j - c_i) (every factor <= 1: nothing overflows).
Bidirectional attention is the same kernels with one scale c = max_j s_j for all rows, one
state K'^T [V 1] (+ the floor) shared by every chunk (stride 0) and no intra-chunk block. ReLU
features: all scales 0 (every factor 1), f = 0, eps inside both feature maps.

Not tuned (written without a GPU): block sizes and warps are fixed guesses, checked only to
compile for sm_90 within an A100's shared memory (tests/test_favor_triton.py compiles them with
triton's ptxas); dots run in IEEE float32 (``DOT_PRECISION``, environment variable
PROTEIN_PERFORMER_TRITON_DOT: "tf32x3" or "tf32" trade accuracy of the logits for tensor-core
speed; statically, ieee dots spill registers on sm_90, tf32x3 spill less in forward). Numbers tested on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# tl.dot input precision: "ieee" (float32, the default), or to measure on a GPU "tf32x3" (three
# tf32 products, about float32 accuracy, on tensor cores) or "tf32" (~1e-3 relative in the logits)
DOT_PRECISION = os.environ.get("PROTEIN_PERFORMER_TRITON_DOT", "ieee")
if DOT_PRECISION not in ("ieee", "tf32x3", "tf32"):
    raise ValueError(f"PROTEIN_PERFORMER_TRITON_DOT must be ieee, tf32x3 or tf32, got {DOT_PRECISION!r}")
# Feature columns per step, per kernel, and warps: chosen without a GPU from what ptxas reports for
# sm_90 at d = 64, C = 64 (ieee dots): the fewest register spills with 8 warps. With 64 columns
# _forward and _states compile to 32 registers and 8-10 KiB of stack per thread; _backward needs
# 224 KiB of shared memory (over an A100's 163). To be tuned on the GPU.
BLOCK_M = 32  # _rowmax, _forward (no spills)
BLOCK_M_STATES = 16  # _states, _rstates (no spills)
BLOCK_M_BWD = 16  # _backward (56 B of stack bidirectional, 1.3 KiB causal; 116 KiB shared)
BLOCK_ROWS = 64  # rows per step of the row-max and state kernels
PARTS = 64  # bidirectional K'^T [V 1]: partial sums over at most this many row ranges (parallelism)
NUM_WARPS = 8  # of every kernel but _scan


def _pow2(x: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(int(x)))


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _rowmax(XQ, XK, W, QMAX, S, L, M, D, BL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: B L m (d + 1) / C can pass 2^31
    rows = tl.program_id(1) * BL + tl.arange(0, BL)
    cols = tl.arange(0, BD)
    rvalid = rows < L
    xmask = rvalid[:, None] & (cols[None, :] < D)
    xq = tl.load(XQ + b * L * D + rows[:, None] * D + cols[None, :], mask=xmask, other=0.0)
    xk = tl.load(XK + b * L * D + rows[:, None] * D + cols[None, :], mask=xmask, other=0.0)
    half_sq = 0.5 * tl.sum(xk * xk, axis=1)
    qmax = tl.full((BL,), float("-inf"), tl.float32)
    smax = tl.full((BL,), float("-inf"), tl.float32)
    for m0 in range(0, M, BM):
        mo = m0 + tl.arange(0, BM)
        w = tl.load(W + mo[:, None] * D + cols[None, :], mask=(mo[:, None] < M) & (cols[None, :] < D), other=0.0)
        mvalid = (mo < M)[None, :]
        zq = tl.where(mvalid, tl.dot(xq, tl.trans(w), input_precision=PREC), float("-inf"))
        zk = tl.where(mvalid, tl.dot(xk, tl.trans(w), input_precision=PREC), float("-inf"))
        qmax = tl.maximum(qmax, tl.max(zq, axis=1))
        smax = tl.maximum(smax, tl.max(zk, axis=1))
    tl.store(QMAX + b * L + rows, qmax, mask=rvalid)
    tl.store(S + b * L + rows, smax - half_sq, mask=rvalid)


@triton.jit
def _states(
    XK, VE, W, PAD, SCALE, U, L, M, D, E, ROWS, NP, ratio, feps,
    BL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, RELU: tl.constexpr,
):
    """U[b, p, m-block] = sum over rows [p ROWS, (p + 1) ROWS) of b_j exp(s_j - SCALE[b, p]) [v_j 1]^T
    (columns :E-1 from a (BM, BV) dot, the last one, the key feature sums, as a vector)."""
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: B L m (d + 1) / C can pass 2^31
    p = tl.program_id(1)
    mo = tl.program_id(2) * BM + tl.arange(0, BM)
    mvalid = mo < M
    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BV)
    DV = E - 1
    w = tl.load(W + mo[:, None] * D + cols[None, :], mask=mvalid[:, None] & (cols[None, :] < D), other=0.0)
    scale = tl.load(SCALE + b * NP + p)
    acc = tl.zeros((BM, BV), tl.float32)
    acc_z = tl.zeros((BM,), tl.float32)
    start = p * ROWS
    stop = tl.minimum(start + ROWS, L)
    for r0 in range(start, stop, BL):
        rows = r0 + tl.arange(0, BL)
        rvalid = rows < stop
        xk = tl.load(XK + b * L * D + rows[:, None] * D + cols[None, :], mask=rvalid[:, None] & (cols[None, :] < D), other=0.0)
        pad = tl.load(PAD + b * L + rows, mask=rvalid, other=1)
        z = tl.dot(xk, tl.trans(w), input_precision=PREC)
        keep = (rvalid & (pad == 0))[:, None] & mvalid[None, :]
        if RELU:
            kf = tl.where(keep, tl.maximum(z, 0.0) + feps, 0.0)
        else:
            z = z - 0.5 * tl.sum(xk * xk, axis=1)[:, None] - scale
            kf = tl.where(keep, tl.exp(tl.minimum(z, 0.0)) * ratio, 0.0)
        ve = tl.load(VE + b * L * E + rows[:, None] * E + vcols[None, :], mask=rvalid[:, None] & (vcols[None, :] < DV), other=0.0)
        acc += tl.dot(tl.trans(kf), ve, input_precision=PREC)
        acc_z += tl.sum(kf, axis=0)  # the ones column: kf is zero for padded keys
    base = U + (b * NP + p) * M * E + mo * E
    tl.store(base[:, None] + vcols[None, :], acc, mask=mvalid[:, None] & (vcols[None, :] < DV))
    tl.store(base + DV, acc_z, mask=mvalid)


@triton.jit
def _scan(U, P, OUT, N, X, REVERSE: tl.constexpr, BX: tl.constexpr):
    """OUT[t] = the state before chunk t: forward S_{t+1} = S_t exp(P_t - P_{t+1}) + U_t (S_0 = 0);
    reverse R_{t-1} = R_t exp(P_t - P_{t+1}) + U_t (R_{N-1} = 0). U, OUT: (B, N, X); P: (B, N + 1).
    OUT may be U (in place)."""
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: B L m (d + 1) / C can pass 2^31
    xo = tl.program_id(1) * BX + tl.arange(0, BX)
    xvalid = xo < X
    state = tl.zeros((BX,), tl.float32)
    for i in range(0, N):
        t = N - 1 - i if REVERSE else i
        u = tl.load(U + (b * N + t) * X + xo, mask=xvalid, other=0.0)  # before the store: OUT may be U
        tl.store(OUT + (b * N + t) * X + xo, state, mask=xvalid)
        p_t = tl.load(P + b * (N + 1) + t)
        p_next = tl.load(P + b * (N + 1) + t + 1)
        state = state * tl.exp(tl.minimum(p_t - p_next, 0.0)) + u


@triton.jit
def _features(xq, xk, w, qmax, s, half_sq, kvalid, mvalid, ratio, floor, feps, PREC: tl.constexpr, RELU: tl.constexpr):
    """Query features a = r exp(w^T xq - q_max) + f and key features b = r exp(w^T xk - |xk|^2/2 - s)
    (relu: a = relu(w^T xq) + eps, b = relu(w^T xk) + eps), zero for invalid keys and feature
    columns, of one (C, BM) block."""
    zq = tl.dot(xq, tl.trans(w), input_precision=PREC)
    zk = tl.dot(xk, tl.trans(w), input_precision=PREC)
    keep = kvalid[:, None] & mvalid[None, :]
    if RELU:
        a = tl.where(mvalid[None, :], tl.maximum(zq, 0.0) + feps, 0.0)
        kf = tl.where(keep, tl.maximum(zk, 0.0) + feps, 0.0)
    else:
        a = tl.where(mvalid[None, :], tl.exp(tl.minimum(zq - qmax[:, None], 0.0)) * ratio + floor, 0.0)
        kf = tl.where(keep, tl.exp(tl.minimum(zk - half_sq[:, None] - s[:, None], 0.0)) * ratio, 0.0)
    return a, kf


@triton.jit
def _forward(
    XQ, XK, VE, W, PAD, QMAX, S, C, s_cb, s_cl, MPREV, s_mb, s_mn, ST, s_sb, s_sn, EP, s_eb, s_en,
    OUT, ASUM, L, M, D, E, NC, ratio, floor, feps,
    CAUSAL: tl.constexpr, CH: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    RELU: tl.constexpr,
):
    """out[:, :E-1] = numerators, out[:, E-1] = denominators of one chunk of rows (the denominator
    column of [v 1], of the states and of E_t is handled as a vector, never padded into a tile)."""
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: B L m (d + 1) / C can pass 2^31
    t = tl.program_id(1)
    rows = t * CH + tl.arange(0, CH)
    rvalid = rows < L
    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BV)
    DV = E - 1
    xmask = rvalid[:, None] & (cols[None, :] < D)
    xq = tl.load(XQ + b * L * D + rows[:, None] * D + cols[None, :], mask=xmask, other=0.0)
    xk = tl.load(XK + b * L * D + rows[:, None] * D + cols[None, :], mask=xmask, other=0.0)
    half_sq = 0.5 * tl.sum(xk * xk, axis=1)
    qmax = tl.load(QMAX + b * L + rows, mask=rvalid, other=0.0)
    s = tl.load(S + b * L + rows, mask=rvalid, other=0.0)
    c = tl.load(C + b * s_cb + rows * s_cl, mask=rvalid, other=0.0)
    pad = tl.load(PAD + b * L + rows, mask=rvalid, other=1)
    kvalid = rvalid & (pad == 0)
    m_prev = tl.load(MPREV + b * s_mb + t * s_mn)
    acc = tl.zeros((CH, BV), tl.float32)
    acc_z = tl.zeros((CH,), tl.float32)
    qk = tl.zeros((CH, CH), tl.float32)
    a_sum = tl.zeros((CH,), tl.float32)
    for m0 in range(0, M, BM):
        mo = m0 + tl.arange(0, BM)
        mvalid = mo < M
        w = tl.load(W + mo[:, None] * D + cols[None, :], mask=mvalid[:, None] & (cols[None, :] < D), other=0.0)
        a, kf = _features(xq, xk, w, qmax, s, half_sq, kvalid, mvalid, ratio, floor, feps, PREC, RELU)
        a_sum += tl.sum(a, axis=1)
        sbase = ST + b * s_sb + t * s_sn + mo * E
        st = tl.load(sbase[:, None] + vcols[None, :], mask=mvalid[:, None] & (vcols[None, :] < DV), other=0.0)
        st_z = tl.load(sbase + DV, mask=mvalid, other=0.0)
        acc += tl.dot(a, st, input_precision=PREC)
        acc_z += tl.sum(a * st_z[None, :], axis=1)
        if CAUSAL:
            qk += tl.dot(a, tl.trans(kf), input_precision=PREC)
    beta = tl.exp(tl.minimum(m_prev - c, 0.0))
    out = acc * beta[:, None]
    out_z = acc_z * beta
    if CAUSAL:
        tri = rows[:, None] >= rows[None, :]
        scale = tl.exp(tl.minimum(s[None, :] - c[:, None], 0.0))  # W_ij = exp(s_j - c_i)
        scores = tl.where(tri, qk * scale + floor * a_sum[:, None], 0.0)
        ve = tl.load(VE + b * L * E + rows[:, None] * E + vcols[None, :], mask=rvalid[:, None] & (vcols[None, :] < DV), other=0.0)
        out += tl.dot(scores, ve, input_precision=PREC)
        out_z += tl.sum(tl.where(kvalid[None, :], scores, 0.0), axis=1)  # the ones column of [v 1]
        e_prev = tl.load(EP + b * s_eb + t * s_en + vcols, mask=vcols < DV, other=0.0)
        e_prev_z = tl.load(EP + b * s_eb + t * s_en + DV)
        out += floor * a_sum[:, None] * e_prev[None, :]
        out_z += floor * a_sum * e_prev_z
    obase = OUT + b * L * E + rows * E
    tl.store(obase[:, None] + vcols[None, :], out, mask=rvalid[:, None] & (vcols[None, :] < DV))
    tl.store(obase + DV, out_z, mask=rvalid)
    tl.store(ASUM + b * L + rows, a_sum, mask=rvalid)


@triton.jit
def _rstates(
    XQ, G, W, QMAX, C, s_cb, s_cl, SCALE, s_pb, s_pn, V, L, M, D, E, ROWS, NP, ratio, floor, feps,
    BL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, RELU: tl.constexpr,
):
    """V[b, p, m-block] = sum over rows [p ROWS, (p + 1) ROWS) of a_i exp(SCALE[b, p] - c_i) G_i^T."""
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: B L m (d + 1) / C can pass 2^31
    p = tl.program_id(1)
    mo = tl.program_id(2) * BM + tl.arange(0, BM)
    mvalid = mo < M
    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BV)
    DV = E - 1
    w = tl.load(W + mo[:, None] * D + cols[None, :], mask=mvalid[:, None] & (cols[None, :] < D), other=0.0)
    scale = tl.load(SCALE + b * s_pb + p * s_pn)
    acc = tl.zeros((BM, BV), tl.float32)
    acc_z = tl.zeros((BM,), tl.float32)
    start = p * ROWS
    stop = tl.minimum(start + ROWS, L)
    for r0 in range(start, stop, BL):
        rows = r0 + tl.arange(0, BL)
        rvalid = rows < stop
        xq = tl.load(XQ + b * L * D + rows[:, None] * D + cols[None, :], mask=rvalid[:, None] & (cols[None, :] < D), other=0.0)
        qmax = tl.load(QMAX + b * L + rows, mask=rvalid, other=0.0)
        c = tl.load(C + b * s_cb + rows * s_cl, mask=rvalid, other=0.0)
        z = tl.dot(xq, tl.trans(w), input_precision=PREC)
        if RELU:
            a = tl.maximum(z, 0.0) + feps
        else:
            a = tl.exp(tl.minimum(z - qmax[:, None], 0.0)) * ratio + floor
        a = tl.where(rvalid[:, None] & mvalid[None, :], a * tl.exp(tl.minimum(scale - c, 0.0))[:, None], 0.0)
        g = tl.load(G + b * L * E + rows[:, None] * E + vcols[None, :], mask=rvalid[:, None] & (vcols[None, :] < DV), other=0.0)
        g_z = tl.load(G + b * L * E + rows * E + DV, mask=rvalid, other=0.0)
        acc += tl.dot(tl.trans(a), g, input_precision=PREC)
        acc_z += tl.sum(a * g_z[:, None], axis=0)
    base = V + (b * NP + p) * M * E + mo * E
    tl.store(base[:, None] + vcols[None, :], acc, mask=mvalid[:, None] & (vcols[None, :] < DV))
    tl.store(base + DV, acc_z, mask=mvalid)


@triton.jit
def _backward(
    XQ, XK, VE, G, W, PAD, QMAX, S, C, s_cb, s_cl, MPREV, s_mb, s_mn, MLAST, s_lb, s_ln,
    ST, s_sb, s_sn, RT, s_rb, s_rn, EP, s_eb, s_en, FT, s_fb, s_fn,
    DXQ, DXK, DV_, L, M, D, E, NC, ratio, floor, feps,
    CAUSAL: tl.constexpr, CH: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    RELU: tl.constexpr,
):
    """d xq, d xk (through the feature maps) and d v (zero for padded keys; the gradient of the ones
    column is never needed) of one chunk of rows. G = dL/d[num | den]: its last column and that of
    [v 1], S_t and R_t are handled as vectors."""
    b = tl.program_id(0).to(tl.int64)  # offsets in int64: B L m (d + 1) / C can pass 2^31
    t = tl.program_id(1)
    rows = t * CH + tl.arange(0, CH)
    rvalid = rows < L
    cols = tl.arange(0, BD)
    vcols = tl.arange(0, BV)
    DV = E - 1
    xmask = rvalid[:, None] & (cols[None, :] < D)
    vmask = rvalid[:, None] & (vcols[None, :] < DV)
    xq = tl.load(XQ + b * L * D + rows[:, None] * D + cols[None, :], mask=xmask, other=0.0)
    xk = tl.load(XK + b * L * D + rows[:, None] * D + cols[None, :], mask=xmask, other=0.0)
    ve = tl.load(VE + b * L * E + rows[:, None] * E + vcols[None, :], mask=vmask, other=0.0)
    g = tl.load(G + b * L * E + rows[:, None] * E + vcols[None, :], mask=vmask, other=0.0)
    g_z = tl.load(G + b * L * E + rows * E + DV, mask=rvalid, other=0.0)
    half_sq = 0.5 * tl.sum(xk * xk, axis=1)
    qmax = tl.load(QMAX + b * L + rows, mask=rvalid, other=0.0)
    s = tl.load(S + b * L + rows, mask=rvalid, other=0.0)
    c = tl.load(C + b * s_cb + rows * s_cl, mask=rvalid, other=0.0)
    pad = tl.load(PAD + b * L + rows, mask=rvalid, other=1)
    kvalid = rvalid & (pad == 0)
    ones = tl.where(kvalid, 1.0, 0.0)  # the last column of [v 1]
    beta = tl.exp(tl.minimum(tl.load(MPREV + b * s_mb + t * s_mn) - c, 0.0))
    gamma = tl.exp(tl.minimum(s - tl.load(MLAST + b * s_lb + t * s_ln), 0.0))
    f_t = tl.load(FT + b * s_fb + t * s_fn + vcols, mask=vcols < DV, other=0.0)
    tri = rows[:, None] >= rows[None, :]
    hw = tl.zeros((CH, CH), tl.float32)
    da_floor = tl.zeros((CH,), tl.float32)
    scale = tl.zeros((CH, CH), tl.float32)
    if CAUSAL:
        h = tl.dot(g, tl.trans(ve), input_precision=PREC) + g_z[:, None] * ones[None, :]
        h = tl.where(tri, h, 0.0)  # H = tril(G [V 1]^T)
        e_prev = tl.load(EP + b * s_eb + t * s_en + vcols, mask=vcols < DV, other=0.0)
        e_prev_z = tl.load(EP + b * s_eb + t * s_en + DV)
        da_floor = floor * (tl.sum(h, axis=1) + tl.sum(g * e_prev[None, :], axis=1) + g_z * e_prev_z)
        scale = tl.exp(tl.minimum(s[None, :] - c[:, None], 0.0))
        hw = h * scale
    dxq = tl.zeros((CH, BD), tl.float32)
    dxk = tl.zeros((CH, BD), tl.float32)
    rowsum_k = tl.zeros((CH,), tl.float32)
    b_r = tl.zeros((CH, BV), tl.float32)
    qk = tl.zeros((CH, CH), tl.float32)
    a_sum = tl.zeros((CH,), tl.float32)
    for m0 in range(0, M, BM):
        mo = m0 + tl.arange(0, BM)
        mvalid = mo < M
        smask = mvalid[:, None] & (vcols[None, :] < DV)
        w = tl.load(W + mo[:, None] * D + cols[None, :], mask=mvalid[:, None] & (cols[None, :] < D), other=0.0)
        a, kf = _features(xq, xk, w, qmax, s, half_sq, kvalid, mvalid, ratio, floor, feps, PREC, RELU)
        sbase = ST + b * s_sb + t * s_sn + mo * E
        rbase = RT + b * s_rb + t * s_rn + mo * E
        st = tl.load(sbase[:, None] + vcols[None, :], mask=smask, other=0.0)
        st_z = tl.load(sbase + DV, mask=mvalid, other=0.0)
        rt = tl.load(rbase[:, None] + vcols[None, :], mask=smask, other=0.0)
        rt_z = tl.load(rbase + DV, mask=mvalid, other=0.0)
        da = (tl.dot(g, tl.trans(st), input_precision=PREC) + g_z[:, None] * st_z[None, :]) * beta[:, None]
        db = (tl.dot(ve, tl.trans(rt), input_precision=PREC) + ones[:, None] * rt_z[None, :]) * gamma[:, None]
        if CAUSAL:
            da += tl.dot(hw, kf, input_precision=PREC) + da_floor[:, None]
            db += tl.dot(tl.trans(hw), a, input_precision=PREC)
            qk += tl.dot(a, tl.trans(kf), input_precision=PREC)
            a_sum += tl.sum(a, axis=1)
        if RELU:  # d a / d z = [z > 0] (a = relu(z) + eps; zero for invalid keys and columns)
            dzq = tl.where(a > feps, da, 0.0)
            dzk = tl.where(kf > feps, db, 0.0)
        else:
            dzq = tl.where(mvalid[None, :], da * (a - floor), 0.0)  # d a / d z = a - f
            dzk = db * kf  # d b / d z = b (zero for invalid keys and columns)
        dxq += tl.dot(dzq, w, input_precision=PREC)
        dxk += tl.dot(dzk, w, input_precision=PREC)
        rowsum_k += tl.sum(dzk, axis=1)
        b_r += tl.dot(kf, rt, input_precision=PREC)
    if not RELU:
        dxk -= xk * rowsum_k[:, None]  # z = w^T x - |x|^2 / 2
    dv = b_r * gamma[:, None] + floor * f_t[None, :]
    if CAUSAL:
        scores = tl.where(tri, qk * scale + floor * a_sum[:, None], 0.0)
        dv += tl.dot(tl.trans(scores), g, input_precision=PREC)
    dv = tl.where(kvalid[:, None], dv, 0.0)  # padded keys: no value gradient
    tl.store(DXQ + b * L * D + rows[:, None] * D + cols[None, :], dxq, mask=xmask)
    tl.store(DXK + b * L * D + rows[:, None] * D + cols[None, :], dxk, mask=xmask)
    tl.store(DV_ + b * L * DV + rows[:, None] * DV + vcols[None, :], dv, mask=vmask)


# ------------------------------------------------------------------------------ host side
class _Plan:
    """Sizes, block shapes and the per-row / per-chunk scales of one call."""

    def __init__(self, xq, xk, v, w, pad, kind, causal, eps, chunk):
        self.B, self.L, self.D = xq.shape
        self.M = w.shape[0]
        self.DV = v.shape[-1]
        self.E = self.DV + 1  # [v 1]
        self.BD, self.BV = _pow2(self.D), _pow2(self.DV)
        self.BM = min(BLOCK_M, _pow2(self.M))
        self.BM_STATES = min(BLOCK_M_STATES, _pow2(self.M))
        self.BM_BWD = min(BLOCK_M_BWD, _pow2(self.M))
        self.CH = _pow2(chunk)
        self.n = triton.cdiv(self.L, self.CH)
        self.causal = causal
        self.relu = kind == RELU
        self.ratio = self.M**-0.5
        # softmax: floor f = r eps on every real key feature (and in the query features); relu: eps
        # is inside both feature maps (feps), no stabilizer (all scales 0)
        self.floor = 0.0 if self.relu else self.ratio * eps
        self.feps = eps if self.relu else 0.0
        B, L = self.B, self.L
        self.qmax = torch.zeros(B, L, device=xq.device, dtype=torch.float32)
        self.s = torch.zeros_like(self.qmax)
        if not self.relu:
            _rowmax[(B, triton.cdiv(L, BLOCK_ROWS))](
                xq, xk, w, self.qmax, self.s, L, self.M, self.D, BL=BLOCK_ROWS, BM=self.BM, BD=self.BD, PREC=DOT_PRECISION,
                num_warps=NUM_WARPS,
            )
        s_real = self.s.masked_fill(pad.bool(), float("-inf"))
        if causal:
            c = torch.cummax(s_real, dim=1).values
            self.c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
            tail = -L % self.CH  # padded rows keep the last running max
            c_full = torch.cat([self.c, self.c[:, -1:].expand(B, tail)], dim=1) if tail else self.c
            self.m_last = c_full.view(B, self.n, self.CH)[:, :, -1].contiguous()  # M_t
            self.scales = torch.cat([self.m_last[:, :1], self.m_last], dim=1).contiguous()  # P_t = M_{t-1}
            self.m_prev = self.scales[:, : self.n]
        else:
            c = s_real.amax(dim=1)
            c = torch.where(torch.isfinite(c), c, torch.zeros_like(c)).contiguous()  # (B,)
            self.c = c[:, None].expand(B, L)
            self.m_last = self.m_prev = c[:, None].expand(B, self.n)
            self.scales = c[:, None].contiguous()

    def states(self, xk, v_ext, w, pad):
        """The key states entering every chunk (B, n, m, E) (bidirectional: K'^T [V 1] + floor,
        stride 0 over chunks) and the floor's sums E_t (B, n, E)."""
        B, L, n, M, E = self.B, self.L, self.n, self.M, self.E
        rows, parts = self.split()
        u = torch.empty(B, parts, M, E, device=xk.device, dtype=torch.float32)
        scale = self.m_last if self.causal else self.scales.expand(B, parts).contiguous()
        _states[(B, parts, triton.cdiv(M, self.BM_STATES))](
            xk, v_ext, w, pad, scale.contiguous(), u, L, M, self.D, E, rows, parts, self.ratio, self.feps,
            BL=min(BLOCK_ROWS, self.CH), BM=self.BM_STATES, BD=self.BD, BV=self.BV, PREC=DOT_PRECISION, RELU=self.relu,
            num_warps=NUM_WARPS,
        )
        if not self.causal:
            kv = u.sum(dim=1) + self.floor * v_ext.sum(dim=1)[:, None, :]
            return kv[:, None].expand(B, n, M, E), v_ext.new_zeros(B, 1, E).expand(B, n, E)
        _scan_call(u, self.scales, u, reverse=False)  # in place: the state entering every chunk
        sums = _chunk_sums(v_ext, self.CH, n)
        return u, sums.cumsum(dim=1) - sums

    def split(self) -> tuple[int, int]:
        """(rows per program, programs) of the state kernels: one chunk each when causal; else at
        most PARTS programs of whole chunks, whose partial sums are added (all at the scale c)."""
        if self.causal:
            return self.CH, self.n
        rows = self.CH * triton.cdiv(self.n, PARTS)
        return rows, triton.cdiv(self.L, rows)


def _scan_call(u: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, reverse: bool) -> None:
    B, n = u.shape[:2]
    X = u[0, 0].numel()
    bx = min(1024, _pow2(X))
    _scan[(B, triton.cdiv(X, bx))](u, scales, out, n, X, REVERSE=reverse, BX=bx)


def _chunk_sums(x: torch.Tensor, chunk: int, n: int) -> torch.Tensor:
    """(B, L, E) -> (B, n, E) sums over chunks of rows (the last one short)."""
    tail = n * chunk - x.shape[1]
    if tail:
        x = torch.nn.functional.pad(x, (0, 0, 0, tail))
    return x.view(x.shape[0], n, chunk, x.shape[2]).sum(dim=2)


def _s(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


class _FavorTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xq, xk, v, w, pad, kind, causal, eps, chunk):
        xq, xk, w = xq.contiguous(), xk.contiguous(), w.contiguous()
        plan = _Plan(xq, xk, v, w, pad, kind, causal, eps, chunk)
        B, L, DV, E = plan.B, plan.L, plan.DV, plan.E
        v_ext = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).masked_fill_(pad.bool()[..., None], 0.0).contiguous()
        st, e_prev = plan.states(xk, v_ext, w, pad)
        out = torch.empty(B, L, E, device=xq.device, dtype=torch.float32)
        a_sum = torch.empty(B, L, device=xq.device, dtype=torch.float32)
        _forward[(B, plan.n)](
            xq, xk, v_ext, w, pad, plan.qmax, plan.s, plan.c, *_s(plan.c), plan.m_prev, *_s(plan.m_prev),
            st, *_s(st), e_prev, *_s(e_prev), out, a_sum, L, plan.M, plan.D, E, plan.n, plan.ratio, plan.floor,
            plan.feps, CAUSAL=causal, CH=plan.CH, BM=plan.BM, BD=plan.BD, BV=plan.BV, PREC=DOT_PRECISION, RELU=plan.relu,
            num_warps=NUM_WARPS,
        )
        num, den = out[..., :DV], out[..., DV:]
        den_safe = torch.where(den == 0, torch.ones_like(den), den)
        result = num / den_safe
        ctx.save_for_backward(xq, xk, v_ext, w, pad, result, den, a_sum)
        ctx.plan = plan
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xq, xk, v_ext, w, pad, out, den, a_sum = ctx.saved_tensors
        plan = ctx.plan
        B, L, D, E, M, n = plan.B, plan.L, plan.D, plan.E, plan.M, plan.n
        zero = den == 0
        g_num = grad.float() / torch.where(zero, torch.ones_like(den), den)
        g_den = torch.where(zero, torch.zeros_like(den), -(g_num * out).sum(dim=-1, keepdim=True))
        g = torch.cat([g_num, g_den], dim=-1).contiguous()  # dL/d[num | den]
        st, e_prev = plan.states(xk, v_ext, w, pad)  # rebuilt, not saved
        rows, parts = plan.split()
        vr = torch.empty(B, parts, M, E, device=xq.device, dtype=torch.float32)
        scale = plan.m_prev if plan.causal else plan.scales.expand(B, parts)
        _rstates[(B, parts, triton.cdiv(M, plan.BM_STATES))](
            xq, g, w, plan.qmax, plan.c, *_s(plan.c), scale, *_s(scale), vr, L, M, D, E, rows, parts,
            plan.ratio, plan.floor, plan.feps, BL=min(BLOCK_ROWS, plan.CH), BM=plan.BM_STATES, BD=plan.BD, BV=plan.BV,
            PREC=DOT_PRECISION, RELU=plan.relu, num_warps=NUM_WARPS,
        )
        ag = a_sum[..., None] * g  # A_i G_i: the floor's part of d[v 1]
        if plan.causal:
            rt = vr
            _scan_call(vr, plan.scales, rt, reverse=True)  # in place
            sums = _chunk_sums(ag, plan.CH, n)
            f_t = sums.flip(1).cumsum(1).flip(1) - sums  # over later chunks
        else:
            rt = vr.sum(dim=1)[:, None].expand(B, n, M, E)
            f_t = ag.sum(dim=1)[:, None].expand(B, n, E)
        dxq, dxk = torch.empty_like(xq), torch.empty_like(xk)
        dv = torch.empty(B, L, plan.DV, device=xq.device, dtype=torch.float32)
        _backward[(B, n)](
            xq, xk, v_ext, g, w, pad, plan.qmax, plan.s, plan.c, *_s(plan.c), plan.m_prev, *_s(plan.m_prev),
            plan.m_last, *_s(plan.m_last), st, *_s(st), rt, *_s(rt), e_prev, *_s(e_prev), f_t, *_s(f_t),
            dxq, dxk, dv, L, M, D, E, n, plan.ratio, plan.floor, plan.feps,
            CAUSAL=plan.causal, CH=plan.CH, BM=plan.BM_BWD, BD=plan.BD, BV=plan.BV, PREC=DOT_PRECISION, RELU=plan.relu,
            num_warps=NUM_WARPS,
        )
        return dxq, dxk, dv, None, None, None, None, None, None


SOFTMAX, RELU = "softmax", "relu"
SUPPORTED_KINDS = (SOFTMAX, RELU)


def favor_triton(
    xq: torch.Tensor,
    xk: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    kind: str,
    causal: bool,
    eps: float,
    chunk: int = 64,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scan.favor_scan`` in Triton kernels: xq = q d^-1/4, xk = k d^-1/4, v (b, h, l, d),
    w (m, d) float32 ([W, -W] for hyperbolic features), kind "softmax" (positive features, floor r eps)
    or "relu" (relu(w^T x) + eps). Returns (b, h, l, d) float32.
    ``chunk`` is rounded up to a power of two (>= 16)."""
    if kind not in SUPPORTED_KINDS:
        raise ValueError(f"the Triton path supports kind {SUPPORTED_KINDS}, got {kind!r}")
    b, h, length, d = xq.shape
    flat = lambda x: x.reshape(b * h, length, x.shape[-1]).float()  # noqa: E731
    if key_padding_mask is None:
        pad = torch.zeros(b * h, length, dtype=torch.int8, device=xq.device)
    else:
        pad = key_padding_mask[:, None, :].expand(b, h, length).reshape(b * h, length).to(torch.int8)
    out = _FavorTriton.apply(
        flat(xq), flat(xk), flat(v), w.detach().float(), pad.contiguous(), kind, bool(causal), float(eps), int(chunk)
    )
    return out.reshape(b, h, length, v.shape[-1])
