"""FAVOR+ attention in Triton (the CUDA path): feature maps fused into chunked kernels.

``favor_triton(xq, xk, v, features, causal, chunk, key_padding_mask)`` has the signature and
the numbers of ``scan.favor_scan`` (same stabilizer semantics, to float32 rounding; nothing is
changed, the eps floor included), for the softmax kernels (positive features; hyperbolic
features pass w = [W, -W], ``FeatureMap.directions``) and relu (relu(w^T x) + eps, no stabilizer). No L x m
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

Not tuned (written without a GPU): block sizes and warps (``triton_ops``) are fixed guesses, checked only to
compile for sm_90 within an A100's shared memory (tests/model/test_favor_triton.py compiles them with
triton's ptxas); dots run in IEEE float32 (``triton_ops.DOT_PRECISION``, environment variable
PROTEIN_PERFORMER_TRITON_DOT: "tf32x3" or "tf32" trade accuracy of the logits for tensor-core
speed; statically, ieee dots spill registers on sm_90, tf32x3 spill less in forward). Numbers tested on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    XK,
    VE,
    W,
    PAD,
    SCALE,
    U,
    L,
    M,
    D,
    E,
    ROWS,
    NP,
    ratio,
    feps,
    BL: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    RELU: tl.constexpr,
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
        xk = tl.load(
            XK + b * L * D + rows[:, None] * D + cols[None, :], mask=rvalid[:, None] & (cols[None, :] < D), other=0.0
        )
        pad = tl.load(PAD + b * L + rows, mask=rvalid, other=1)
        z = tl.dot(xk, tl.trans(w), input_precision=PREC)
        keep = (rvalid & (pad == 0))[:, None] & mvalid[None, :]
        if RELU:
            kf = tl.where(keep, tl.maximum(z, 0.0) + feps, 0.0)
        else:
            z = z - 0.5 * tl.sum(xk * xk, axis=1)[:, None] - scale
            kf = tl.where(keep, tl.exp(tl.minimum(z, 0.0)) * ratio, 0.0)
        ve = tl.load(
            VE + b * L * E + rows[:, None] * E + vcols[None, :], mask=rvalid[:, None] & (vcols[None, :] < DV), other=0.0
        )
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
    XQ,
    XK,
    VE,
    W,
    PAD,
    QMAX,
    S,
    C,
    s_cb,
    s_cl,
    MPREV,
    s_mb,
    s_mn,
    ST,
    s_sb,
    s_sn,
    EP,
    s_eb,
    s_en,
    OUT,
    ASUM,
    L,
    M,
    D,
    E,
    NC,
    ratio,
    floor,
    feps,
    CAUSAL: tl.constexpr,
    CH: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
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
        ve = tl.load(
            VE + b * L * E + rows[:, None] * E + vcols[None, :], mask=rvalid[:, None] & (vcols[None, :] < DV), other=0.0
        )
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
    XQ,
    G,
    W,
    QMAX,
    C,
    s_cb,
    s_cl,
    SCALE,
    s_pb,
    s_pn,
    V,
    L,
    M,
    D,
    E,
    ROWS,
    NP,
    ratio,
    floor,
    feps,
    BL: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    RELU: tl.constexpr,
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
        xq = tl.load(
            XQ + b * L * D + rows[:, None] * D + cols[None, :], mask=rvalid[:, None] & (cols[None, :] < D), other=0.0
        )
        qmax = tl.load(QMAX + b * L + rows, mask=rvalid, other=0.0)
        c = tl.load(C + b * s_cb + rows * s_cl, mask=rvalid, other=0.0)
        z = tl.dot(xq, tl.trans(w), input_precision=PREC)
        if RELU:
            a = tl.maximum(z, 0.0) + feps
        else:
            a = tl.exp(tl.minimum(z - qmax[:, None], 0.0)) * ratio + floor
        a = tl.where(rvalid[:, None] & mvalid[None, :], a * tl.exp(tl.minimum(scale - c, 0.0))[:, None], 0.0)
        g = tl.load(
            G + b * L * E + rows[:, None] * E + vcols[None, :], mask=rvalid[:, None] & (vcols[None, :] < DV), other=0.0
        )
        g_z = tl.load(G + b * L * E + rows * E + DV, mask=rvalid, other=0.0)
        acc += tl.dot(tl.trans(a), g, input_precision=PREC)
        acc_z += tl.sum(a * g_z[:, None], axis=0)
    base = V + (b * NP + p) * M * E + mo * E
    tl.store(base[:, None] + vcols[None, :], acc, mask=mvalid[:, None] & (vcols[None, :] < DV))
    tl.store(base + DV, acc_z, mask=mvalid)


@triton.jit
def _intra_grad(g, g_z, ve, ones, s, c, tri, EP_T, vcols, DV, floor, PREC: tl.constexpr):
    """Causal backward inside a chunk: H W (H = tril(G [V 1]^T), W_ij = exp(s_j - c_i)), the floor's
    part of d a, f (rowsum H + G E_t^T), and W itself."""
    h = tl.dot(g, tl.trans(ve), input_precision=PREC) + g_z[:, None] * ones[None, :]
    h = tl.where(tri, h, 0.0)
    e_prev = tl.load(EP_T + vcols, mask=vcols < DV, other=0.0)
    e_prev_z = tl.load(EP_T + DV)
    da_floor = floor * (tl.sum(h, axis=1) + tl.sum(g * e_prev[None, :], axis=1) + g_z * e_prev_z)
    scale = tl.exp(tl.minimum(s[None, :] - c[:, None], 0.0))
    return h * scale, da_floor, scale


@triton.jit
def _load_state(base, vcols, DV, smask, mvalid):
    """Rows of a chunk state [S | z] at ``base`` (feature offsets): the d_v columns and the last one."""
    return tl.load(base[:, None] + vcols[None, :], mask=smask, other=0.0), tl.load(base + DV, mask=mvalid, other=0.0)


@triton.jit
def _feature_grads(a, kf, da, db, mvalid, floor, feps, RELU: tl.constexpr):
    """dL/dz of the query and key feature maps from dL/da, dL/db."""
    if RELU:  # d a / d z = [z > 0] (a = relu(z) + eps; zero for invalid keys and columns)
        dzq = tl.where(a > feps, da, 0.0)
        dzk = tl.where(kf > feps, db, 0.0)
    else:
        dzq = tl.where(mvalid[None, :], da * (a - floor), 0.0)  # d a / d z = a - f
        dzk = db * kf  # d b / d z = b (zero for invalid keys and columns)
    return dzq, dzk


@triton.jit
def _backward(
    XQ,
    XK,
    VE,
    G,
    W,
    PAD,
    QMAX,
    S,
    C,
    s_cb,
    s_cl,
    MPREV,
    s_mb,
    s_mn,
    MLAST,
    s_lb,
    s_ln,
    ST,
    s_sb,
    s_sn,
    RT,
    s_rb,
    s_rn,
    EP,
    s_eb,
    s_en,
    FT,
    s_fb,
    s_fn,
    DXQ,
    DXK,
    DV_,
    L,
    M,
    D,
    E,
    NC,
    ratio,
    floor,
    feps,
    CAUSAL: tl.constexpr,
    CH: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
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
        hw, da_floor, scale = _intra_grad(g, g_z, ve, ones, s, c, tri, EP + b * s_eb + t * s_en, vcols, DV, floor, PREC)
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
        st, st_z = _load_state(sbase, vcols, DV, smask, mvalid)
        rt, rt_z = _load_state(rbase, vcols, DV, smask, mvalid)
        da = (tl.dot(g, tl.trans(st), input_precision=PREC) + g_z[:, None] * st_z[None, :]) * beta[:, None]
        db = (tl.dot(ve, tl.trans(rt), input_precision=PREC) + ones[:, None] * rt_z[None, :]) * gamma[:, None]
        if CAUSAL:
            da += tl.dot(hw, kf, input_precision=PREC) + da_floor[:, None]
            db += tl.dot(tl.trans(hw), a, input_precision=PREC)
            qk += tl.dot(a, tl.trans(kf), input_precision=PREC)
            a_sum += tl.sum(a, axis=1)
        dzq, dzk = _feature_grads(a, kf, da, db, mvalid, floor, feps, RELU)
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
