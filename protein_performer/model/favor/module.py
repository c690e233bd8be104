"""``FavorAttention``: the FAVOR+ module, a ``FeatureMap`` that attends (the paths, the explicit
matrix, the recurrent step)."""

from __future__ import annotations

import functools

import torch

from protein_performer.model.attention import check_key_padding_mask
from protein_performer.model.favor import probe, recurrent
from protein_performer.model.favor.causal import (
    _scale,
    causal_linear_attention,
    linear_attention,
)
from protein_performer.model.favor.features import (
    FUSED_KINDS,
    FeatureMap,
    causal_stabilizer,
    key_stabilizer,
    no_autocast,
)
from protein_performer.model.favor.recurrent import FavorState
from protein_performer.model.favor.scan import favor_scan
from protein_performer.runtime import freed_memory_kept

IMPLS = ("auto", "scan", "batched", "triton", "fla")
# CPU: the scan wins on long inputs, the batched path (fewer, larger ops) on short or few rows.
# Measured side by side with SDPA (2 threads, fwd+bwd, 8 heads, d 64, m 256, time / SDPA's):
# batch 16 x L 128 causal batched 5.9x, scan 7.7x; 1 x 1024 causal 1.58x vs 1.86x; 2 x 1024 1.70x vs
# 1.63x; 8 x 512 causal 2.6x vs 2.2x, bidirectional 1.9x vs 1.1x; 1 x 8192 causal 0.39x vs 0.29x.
CPU_SCAN_MIN_LENGTH = 512
CPU_SCAN_MIN_ROWS = 16384  # batch x heads x length
# After ``runtime.keep_freed_memory()`` the batched path's large temporaries cost no page faults, and
# causal batched beats the scan (1 x 8 x 8192: 0.28x SDPA vs 0.30x); bidirectional the scan still wins
# (0.078x vs 0.092x). So with the tuning, causal CPU attention stays batched.


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels import (the triton package is installed); imported on first use only."""
    try:
        import protein_performer.model.favor.triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _fla_available() -> bool:
    from protein_performer.model.favor.fla_backend import fla_available

    return fla_available()


def _nonzero(den: torch.Tensor) -> torch.Tensor:
    """D with its zeros (a query with no real key at all) set to 1: a zero output instead of NaN."""
    return torch.where(den == 0, torch.ones_like(den), den)


def shared_linear_attention(
    q_prime: torch.Tensor,
    k_prime: torch.Tensor,
    v_t: torch.Tensor,
    mask: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """D^-1 (Q' ((K')^T V)) with Q', K' (h, l, m) shared by every sequence; values and output head-major:
    v_t (h, e, b, l) -> (h, e, b, l).

    ``mask`` (b, l), True at padding, leaves those keys out; ``floor`` (b or 1, h) is added to every
    real key's features of that sequence and head. In this layout the sequences ride in the rows of
    one matmul per head with no copy of V or of the output. The product is taken in the cheaper
    order: V^T K' then (V^T K') Q'^T, 2 e b l m multiply-adds per head, or, for short sequences
    (l < ~2m), the shared map K' Q'^T (l x l, once) then V^T (K' Q'^T), l^2 m + e b l^2: the same sums.
    Without padding D is the same for every sequence and D^-1 scales the shared factor instead.
    """
    h, e, b, length = v_t.shape
    m = k_prime.shape[-1]
    keep = k_prime.new_ones(1, length) if mask is None else (~mask).to(k_prime.dtype)  # (1 or b, l)
    if mask is not None:
        v_t = v_t * keep
    if floor is not None and floor.shape[0] == 1:  # one floor for every sequence: part of the shared K'
        k_prime, floor = k_prime + floor.t()[..., None], None
    if length * (m + e * b) < 2 * e * b * m:
        right = torch.matmul(k_prime, q_prime.transpose(1, 2))  # (Q' K'^T)^T: (h, l, l)
        left, ones = v_t.reshape(h, e * b, length), keep
    else:
        right = q_prime.transpose(1, 2)  # (h, m, l)
        left = torch.matmul(v_t.reshape(h, e * b, length), k_prime)  # (V^T K')_h: (h, e b, m)
        ones = torch.matmul(keep, k_prime)  # (K'^T 1)^T: (h, 1 or b, m)
    den = torch.matmul(ones, right)  # D: (h, 1 or b, l)
    if mask is None:  # D is the same for every sequence: D^-1 goes into the shared factor
        return torch.matmul(left, right / _nonzero(den)).view(h, e, b, length)
    num = torch.matmul(left, right).view(h, e, b, length)
    if floor is not None:  # each sequence's floor f_b: + f_b (sum_m Q'_im) (sum_j v_j), and f_b n_b in D
        rows, floor = q_prime.sum(dim=-1)[:, None, :], floor.t()  # (h, 1, l), (h, b)
        num = num + (floor[:, None, :] * v_t.sum(dim=-1))[..., None] * rows[:, None]
        den = den + (floor * keep.sum(dim=1))[..., None] * rows
    return num / _nonzero(den)[:, None]


class FavorAttention(FeatureMap):
    """FAVOR+ attention with the interface of ``attention.SoftmaxAttention``: attention over the
    features of its ``FeatureMap`` (the base class, which owns W; its ``kind`` is ``kernel``).

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
        chunk_size: C of the causal chunked prefix sums; None: the implementation's default
            (64 for scan, 128 for batched; measured).
        seed: the seed of the initial draw; ``redraw(seed)`` draws again.
        impl: how ``forward`` computes: "scan" (``scan.py``: features fused into a chunk scan,
            recomputed in backward; half the peak memory, 0.29x exact SDPA's time at L = 8192 causal,
            0.08x bidirectional, 2 threads, plain process; it relies on cache-sized blocks, so on
            cores shared with other heavy jobs it can fall behind batched),
            "batched" (``causal.py``: all chunks in a few batched matmuls, L x m features kept for
            backward), "triton" (``triton_kernels.py``: fused Triton kernels for the
            softmax, softmax_hyp and relu kernels, float32 inside; CUDA tensors, or CPU tensors under
            TRITON_INTERPRET=1), "fla" (causal only: ``fla_backend.py``, flash-linear-attention's
            chunked kernels on our features, same semantics; needs fla-core), or "auto": triton
            for CUDA tensors (not float64) of those kernels when triton imports and passes the probe;
            on the CPU scan from ``CPU_SCAN_MIN_LENGTH`` positions and
            ``CPU_SCAN_MIN_ROWS`` rows (batch x heads x length) on (causal: unless
            ``runtime.keep_freed_memory()`` was called), batched below; batched otherwise. The
            trigonometric kernel always uses "batched".
            On CUDA tensors "auto", "triton" and "fla" run the fast path only after ``probe.py``
            has checked its numbers (output and gradients against the float64 batched path, once per
            device, dtype and configuration); on a mismatch or a launch error they warn once and use
            "batched". ``PROTEIN_PERFORMER_FAVOR_IMPL=batched|triton|fla`` forces that path on CUDA
            tensors for all three, without the probe ("fla" for causal modules; where the forced
            path does not apply, "batched"). On the CPU explicit "triton" / "fla" run unprobed.

    The projection W is the ``FeatureMap``'s buffer ``projection`` (in state_dict, broadcast by DDP);
    the module has no parameters, so an exact model's weights load into a FAVOR+ model with the same
    names.
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
        chunk_size: int | None = None,
        seed: int = 0,
        impl: str = "auto",
    ):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "triton" and kernel not in FUSED_KINDS:
            raise ValueError(f"impl='triton' supports the kernels {FUSED_KINDS}, got {kernel!r}; use impl='auto'")
        if impl == "triton" and not triton_available():
            raise ValueError("impl='triton' needs the triton package (pip install triton); use impl='auto'")
        if impl == "fla" and not causal:
            raise ValueError("impl='fla' is causal only (fla has no bidirectional kernel); use impl='auto'")
        if impl == "fla" and not _fla_available():
            raise ValueError(
                "impl='fla' needs flash-linear-attention: pip install 'fla-core>=0.6,<0.7'; use impl='auto'"
            )
        probe.forced_impl()  # a bad PROTEIN_PERFORMER_FAVOR_IMPL fails here, on any device
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        super().__init__(dim_head, nb_features, kernel, orthogonal, norm=norm, eps=eps, seed=seed)
        self.causal = causal
        self.chunk_size = chunk_size
        self.impl = impl

    def extra_repr(self) -> str:
        return (
            f"dim_head={self.dim_head}, nb_features={self.nb_features}, kernel={self.kind!r}, "
            f"orthogonal={self.orthogonal}, causal={self.causal}, norm={self.norm!r}, eps={self.eps}"
        )

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 4 or x.shape[-1] != self.dim_head:
            raise ValueError(f"{name} must be (batch, heads, length, {self.dim_head}), got {tuple(x.shape)}")

    # ---------------------------------------------------------------------------- attention
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q, k, v: (b, h, l, d) -> (b, h, l, d) in v's dtype; fp32 inside."""
        for name, x in (("q", q), ("k", k)):
            self._check(x, name)
        mask = check_key_padding_mask(key_padding_mask, k)
        return self.attend(q, k, v, mask, self.resolve_impl(q))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, impl: str
    ) -> torch.Tensor:
        """``forward`` through the implementation ``impl``, unchecked and unprobed (the probe runs
        the fast and the batched path through it)."""
        out_dtype = v.dtype
        if impl == "fla":
            return self._forward_fla(q, k, v, mask).to(out_dtype)
        if impl != "batched":
            with no_autocast(q.device.type):
                xq, xk = self.scaled(q), self.scaled(k)
                if impl == "triton":
                    from protein_performer.model.favor.triton_ops import favor_triton as run
                else:
                    run = favor_scan
                out = run(xq, xk, v.to(xq.dtype), self, self.causal, self._chunk(impl), mask)
            return out.to(out_dtype)
        with no_autocast(q.device.type):
            q_prime = self.features(q, True)
            if self.causal and self.kind != "relu":
                k_prime, key_scale = self.causal_key_features(k, mask)
                out = causal_linear_attention(
                    q_prime, k_prime, v.to(q_prime.dtype), self._chunk(impl), key_scale, self.feature_floor(), mask
                )
            elif self.causal:  # relu features have no stabilizer: eps is part of them
                out = causal_linear_attention(
                    q_prime, self.features(k, False, mask), v.to(q_prime.dtype), self._chunk(impl)
                )
            else:
                out = linear_attention(q_prime, self.features(k, False, mask), v.to(q_prime.dtype))
        return out.to(out_dtype)

    def shared_forward(
        self, q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bidirectional attention with queries and keys shared by the batch (factored attention):
        q, k (1, h, l, d) and values head-major, v_t (h, d, b, l) -> the output head-major (h, d, b, l),
        equal to ``forward(q.expand(b, ...), k.expand(b, ...), v)`` with v = v_t.permute(2, 0, 3, 1).

        Q' and K' (h, l, m) are made once, not once per sequence (``shared_linear_attention``, the
        same matmuls on every device: ``impl`` does not apply).
        Padded keys drop out through zero rows of V and of the 1 instead of zero features. The keys'
        softmax stabilizer is then c, the max over all keys, not c_b, the max over sequence b's real
        keys: the unshared features are exp(c - c_b) (K'_c + f exp(c_b - c)), K'_c the features at c
        without the floor f, and exp(c - c_b) cancels in D^-1, so here the floor is f exp(c_b - c).
        """
        if self.causal:
            raise ValueError("shared_forward is bidirectional; causal attention uses forward")
        h, _, b, length = v_t.shape
        for name, x in (("q", q), ("k", k)):
            self._check(x, name)
            if x.shape[:3] != (1, h, length):
                raise ValueError(f"{name} must be (1, {h}, {length}, {self.dim_head}), got {tuple(x.shape)}")
        mask = check_key_padding_mask(key_padding_mask, v_t.permute(2, 0, 3, 1))
        if mask is not None and not mask.any():
            mask = None  # no padding (aligned rows): the cheaper path, the same numbers
        softmax = self.kind in ("softmax", "softmax_hyp")
        with no_autocast(q.device.type):
            q_prime = self.features(q, True)[0]  # (h, l, m)
            scales = self.key_scales(k)[..., None]  # (1, h, l, 1): each key's own scale, detached
            c = key_stabilizer(scales)  # (1, h, 1, 1)
            k_prime = self.features(k, False, stabilizer=c, eps=0.0 if softmax else None)[0]  # floor apart
            floor = None
            if softmax:
                c_b = c if mask is None else key_stabilizer(scales.expand(b, -1, -1, -1), mask)
                floor = _scale(c_b - c)[..., 0, 0].mul_(self.feature_floor())  # f exp(c_b - c): (b or 1, h)
            out = shared_linear_attention(q_prime, k_prime, v_t.to(q_prime.dtype), mask, floor)
        return out.to(v_t.dtype)

    def _forward_fla(self, q, k, v, mask):
        from protein_performer.model.favor.fla_backend import favor_causal_fla

        with no_autocast(q.device.type):
            q_prime = self.features(q, True)
            v = v.to(q_prime.dtype)
            if self.kind == "relu":  # no stabilizer: eps is part of the features
                return favor_causal_fla(q_prime, self.features(k, False, mask), v, key_padding_mask=mask)
            k_hat, key_scale = self.causal_key_features(k, mask)
            return favor_causal_fla(q_prime, k_hat, v, key_scale, self.feature_floor(), mask)

    def _chunk(self, impl: str) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return 128 if impl == "batched" else 64

    def resolve_impl(self, x: torch.Tensor) -> str:
        """The implementation ``forward`` uses for inputs like ``x`` (see ``impl``). On CUDA tensors
        (``probe.FAST_DEVICE_TYPES``) a fast path runs only after ``probe.fast_path_ok`` passed it for
        this configuration, or when ``PROTEIN_PERFORMER_FAVOR_IMPL`` forces it."""
        if self.kind not in FUSED_KINDS:
            return "batched"
        if self.impl in ("batched", "scan"):
            return self.impl
        if x.device.type not in probe.FAST_DEVICE_TYPES:
            return self.impl if self.impl != "auto" else self._cpu_impl(x)
        if self.impl == "auto" and x.dtype == torch.float64:
            return "batched"  # float64 (gradcheck) stays exact
        forced = probe.forced_impl()
        impl = forced or ("triton" if self.impl == "auto" else self.impl)
        if impl == "batched" or not self._runs(impl):
            return "batched"
        if forced is None and not probe.fast_path_ok(self, impl, x):
            return "batched"
        return impl

    def _runs(self, impl: str) -> bool:
        """Whether the fast path ``impl`` covers this module (kernel, direction) and imports."""
        if impl == "triton":
            return self.kind in FUSED_KINDS and triton_available()
        return self.causal and _fla_available()

    def _cpu_impl(self, x: torch.Tensor) -> str:
        """impl "auto" on a device without probed fast paths: the CPU rule (see ``impl``), else batched."""
        rows = x.shape[0] * x.shape[1] * x.shape[2]
        long_enough = x.shape[2] >= CPU_SCAN_MIN_LENGTH and rows >= CPU_SCAN_MIN_ROWS
        if x.device.type == "cpu" and long_enough and not (self.causal and freed_memory_kept()):
            return "scan"
        return "batched"

    def attention_matrix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        block_rows: int | None = None,
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
        with no_autocast(q.device.type), torch.no_grad():
            q_prime = self.features(q, True)
            scaled = self.causal and self.kind != "relu"  # per-query stabilizer, as in forward
            if scaled:
                k_prime, key_scale = self.causal_key_features(k, mask)
                query_scale = causal_stabilizer(key_scale, mask)
                floor = self.feature_floor() * (1.0 if mask is None else (~mask)[:, None, None, :].to(q_prime.dtype))
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
        self,
        batch: int,
        heads: int,
        dim_v: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> FavorState:
        """An empty causal state for ``step`` (``recurrent.init_state``)."""
        return recurrent.init_state(self, batch, heads, dim_v, device, dtype)

    @torch.no_grad()
    def step(
        self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: FavorState
    ) -> tuple[torch.Tensor, FavorState]:
        """One causal step: q_t, k_t, v_t (b, h, 1, d) -> (out_t (b, h, 1, d), new state); out_t equals
        the last row of ``forward`` run causally on all tokens given so far (``recurrent.step``)."""
        if not self.causal:
            raise RuntimeError("step() is for causal attention; build FavorAttention(causal=True)")
        with no_autocast(q_t.device.type):
            out, new_state = recurrent.step(self, q_t, k_t, v_t, state)
        return out.to(v_t.dtype), new_state
