"""Host side of the Triton FAVOR+ path: plans the launches of ``triton_kernels`` and wraps them in
one autograd Function, ``favor_triton(xq, xk, v, features, causal, chunk, key_padding_mask)``,
with the signature and numbers of ``scan.favor_scan`` (see ``triton_kernels`` for the equations
each kernel computes and what is saved for backward).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
from torch.autograd.function import once_differentiable

from protein_performer.model.favor.triton_kernels import _backward, _forward, _rowmax, _rstates, _scan, _states

if TYPE_CHECKING:
    from protein_performer.model.favor.features import FeatureMap

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


class _Plan:
    """Sizes, block shapes and the per-row / per-chunk scales of one call."""

    def __init__(self, xq, xk, v, w, pad, fm, causal, chunk):
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
        self.relu = fm.kind == "relu"
        self.ratio = self.M**-0.5
        # softmax: floor f = r eps on every real key feature (and in the query features); relu: eps
        # is inside both feature maps (feps), no stabilizer (all scales 0)
        self.floor = fm.fused_floor()
        self.feps = fm.eps if self.relu else 0.0
        B, L = self.B, self.L
        self.qmax = torch.zeros(B, L, device=xq.device, dtype=torch.float32)
        self.s = torch.zeros_like(self.qmax)
        if not self.relu:
            _rowmax[(B, triton.cdiv(L, BLOCK_ROWS))](
                xq,
                xk,
                w,
                self.qmax,
                self.s,
                L,
                self.M,
                self.D,
                BL=BLOCK_ROWS,
                BM=self.BM,
                BD=self.BD,
                PREC=DOT_PRECISION,
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
            xk,
            v_ext,
            w,
            pad,
            scale.contiguous(),
            u,
            L,
            M,
            self.D,
            E,
            rows,
            parts,
            self.ratio,
            self.feps,
            BL=min(BLOCK_ROWS, self.CH),
            BM=self.BM_STATES,
            BD=self.BD,
            BV=self.BV,
            PREC=DOT_PRECISION,
            RELU=self.relu,
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


def _reverse_states(plan: _Plan, xq: torch.Tensor, g: torch.Tensor, w: torch.Tensor, a_sum: torch.Tensor):
    """R_t (the suffix states of the queries' a_i beta_i G_i^T, per chunk) and F_t (the floor's part
    of d[v 1], sum of A_i G_i over later chunks); bidirectional: one state for every chunk."""
    B, L, D, E, M, n = plan.B, plan.L, plan.D, plan.E, plan.M, plan.n
    rows, parts = plan.split()
    vr = torch.empty(B, parts, M, E, device=xq.device, dtype=torch.float32)
    scale = plan.m_prev if plan.causal else plan.scales.expand(B, parts)
    _rstates[(B, parts, triton.cdiv(M, plan.BM_STATES))](
        xq,
        g,
        w,
        plan.qmax,
        plan.c,
        *_s(plan.c),
        scale,
        *_s(scale),
        vr,
        L,
        M,
        D,
        E,
        rows,
        parts,
        plan.ratio,
        plan.floor,
        plan.feps,
        BL=min(BLOCK_ROWS, plan.CH),
        BM=plan.BM_STATES,
        BD=plan.BD,
        BV=plan.BV,
        PREC=DOT_PRECISION,
        RELU=plan.relu,
        num_warps=NUM_WARPS,
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
    return rt, f_t


class _FavorTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xq, xk, v, w, pad, fm, causal, chunk):
        xq, xk, w = xq.contiguous(), xk.contiguous(), w.contiguous()
        plan = _Plan(xq, xk, v, w, pad, fm, causal, chunk)
        B, L, DV, E = plan.B, plan.L, plan.DV, plan.E
        v_ext = (
            torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).masked_fill_(pad.bool()[..., None], 0.0).contiguous()
        )
        st, e_prev = plan.states(xk, v_ext, w, pad)
        out = torch.empty(B, L, E, device=xq.device, dtype=torch.float32)
        a_sum = torch.empty(B, L, device=xq.device, dtype=torch.float32)
        _forward[(B, plan.n)](
            xq,
            xk,
            v_ext,
            w,
            pad,
            plan.qmax,
            plan.s,
            plan.c,
            *_s(plan.c),
            plan.m_prev,
            *_s(plan.m_prev),
            st,
            *_s(st),
            e_prev,
            *_s(e_prev),
            out,
            a_sum,
            L,
            plan.M,
            plan.D,
            E,
            plan.n,
            plan.ratio,
            plan.floor,
            plan.feps,
            CAUSAL=causal,
            CH=plan.CH,
            BM=plan.BM,
            BD=plan.BD,
            BV=plan.BV,
            PREC=DOT_PRECISION,
            RELU=plan.relu,
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
        rt, f_t = _reverse_states(plan, xq, g, w, a_sum)
        dxq, dxk = torch.empty_like(xq), torch.empty_like(xk)
        dv = torch.empty(B, L, plan.DV, device=xq.device, dtype=torch.float32)
        _backward[(B, n)](
            xq,
            xk,
            v_ext,
            g,
            w,
            pad,
            plan.qmax,
            plan.s,
            plan.c,
            *_s(plan.c),
            plan.m_prev,
            *_s(plan.m_prev),
            plan.m_last,
            *_s(plan.m_last),
            st,
            *_s(st),
            rt,
            *_s(rt),
            e_prev,
            *_s(e_prev),
            f_t,
            *_s(f_t),
            dxq,
            dxk,
            dv,
            L,
            M,
            D,
            E,
            n,
            plan.ratio,
            plan.floor,
            plan.feps,
            CAUSAL=plan.causal,
            CH=plan.CH,
            BM=plan.BM_BWD,
            BD=plan.BD,
            BV=plan.BV,
            PREC=DOT_PRECISION,
            RELU=plan.relu,
            num_warps=NUM_WARPS,
        )
        return dxq, dxk, dv, None, None, None, None, None


def favor_triton(
    xq: torch.Tensor,
    xk: torch.Tensor,
    v: torch.Tensor,
    features: FeatureMap,
    causal: bool,
    chunk: int = 64,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scan.favor_scan`` in Triton kernels: xq = q d^-1/4, xk = k d^-1/4, v (b, h, l, d), the
    feature map ``features`` (a kernel in ``FUSED_KINDS``: positive softmax features, floor r eps,
    or relu(w^T x) + eps; its directions in float32). Returns (b, h, l, d) float32.
    ``chunk`` is rounded up to a power of two (>= 16)."""
    w = features.directions(torch.float32).detach()  # raises for a kernel the Triton kernels lack
    b, h, length, d = xq.shape
    flat = lambda x: x.reshape(b * h, length, x.shape[-1]).float()  # noqa: E731
    if key_padding_mask is None:
        pad = torch.zeros(b * h, length, dtype=torch.int8, device=xq.device)
    else:
        pad = key_padding_mask[:, None, :].expand(b, h, length).reshape(b * h, length).to(torch.int8)
    out = _FavorTriton.apply(flat(xq), flat(xk), flat(v), w, pad.contiguous(), features, bool(causal), int(chunk))
    return out.reshape(b, h, length, v.shape[-1])
