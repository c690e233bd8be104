"""FAVOR+ random features and feature maps: one small pure function per equation (see the package
docstring), and ``FeatureMap``, the module that owns the projection W and applies them: the
features of the batched paths, the per-key scales of the causal and recurrent ones, and the features
with their chain rule for the fused paths (``scan.py``, ``triton_ops.py``)."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

log = logging.getLogger("protein_performer.model.favor")

KERNELS = ("softmax", "softmax_hyp", "softmax_trig", "relu")
FUSED_KINDS = ("softmax", "softmax_hyp", "relu")  # the kernels the fused paths (scan, Triton) implement
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
# the feature map of one attention core
# --------------------------------------------------------------------------------------------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 stays float64 (for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def no_autocast(device_type: str):
    """Disable autocast so feature maps and sums stay float32."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


class FeatureMap(nn.Module):
    """The FAVOR+ feature map phi of one attention core: the projection W and the features of q and k.

    Args:
        dim_head: d, the size of q and k per head.
        nb_features: m, the length of phi(x) (hyperbolic and trigonometric kernels use m/2
            directions, two features each; m must then be even).
        kind: "softmax", "softmax_hyp", "softmax_trig" or "relu" (``FavorAttention``'s ``kernel``).
        orthogonal, norm: how W is drawn (``draw_projection``).
        eps: the feature floor; default 1e-6 for softmax kernels, 1e-3 for relu (unused by trig).
        seed: the seed of the initial draw; ``redraw(seed)`` draws again.

    W (``projection``, (m or m/2, d)) is a registered buffer: in the state_dict, broadcast by DDP.
    Every method takes q or k unscaled, (b, h, l, d), and scales it by d^-1/4 itself (``scaled``);
    the fused paths get the scaled rows and the directions instead (``fused_*``).
    """

    def __init__(
        self,
        dim_head: int,
        nb_features: int = 256,
        kind: str = "softmax",
        orthogonal: bool = True,
        *,
        norm: str = "chi",
        eps: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if kind not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kind!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        paired = kind in ("softmax_hyp", "softmax_trig")
        if paired and nb_features % 2:
            raise ValueError(f"kernel {kind!r} needs an even nb_features, got {nb_features}")
        self.dim_head = dim_head
        self.nb_features = nb_features
        self.nb_directions = nb_features // 2 if paired else nb_features
        self.kind = kind
        self.orthogonal = orthogonal
        self.norm = norm
        self.eps = (1e-3 if kind == "relu" else 1e-6) if eps is None else float(eps)
        self.seed = seed
        self.register_buffer("projection", self._draw(seed))

    def _draw(self, seed: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        return draw_projection(self.nb_directions, self.dim_head, generator, self.orthogonal, self.norm)

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw new random features from ``seed``: the same seed gives the same W everywhere."""
        self.projection.copy_(self._draw(seed).to(self.projection.device, self.projection.dtype))
        self.seed = int(seed)
        log.debug("FAVOR+ features redrawn with seed %d", seed)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """x d^-1/4 in the compute dtype (``compute_dtype``): softmax's 1/sqrt(d), split over q and k."""
        return x.to(compute_dtype(x)) * self.dim_head**-0.25

    def feature_floor(self) -> float:
        """The eps floor of every key feature: ratio * eps for positive softmax features (ratio =
        m^-1/2), eps for relu (inside its features), none for trigonometric features."""
        if self.kind == "softmax_trig":
            return 0.0
        if self.kind in ("softmax", "softmax_hyp"):
            return self.eps * self.nb_features**-0.5
        return self.eps

    # ---------------------------------------------------------------------------- batched paths
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
        eps = self.eps if eps is None else eps
        with no_autocast(x.device.type):
            x = self.scaled(x)
            w = self.projection.to(x.dtype)
            if self.kind in ("softmax", "softmax_hyp"):
                return softmax_kernel(x, w, is_query, key_padding_mask, eps, self.kind == "softmax_hyp", stabilizer)
            if self.kind == "softmax_trig":
                return trig_kernel(x, w, is_query, key_padding_mask, stabilizer)
            return relu_kernel(x, w, is_query, key_padding_mask, eps)

    def causal_key_features(
        self, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax-kernel key features at each key's own scale and the scales s (``per_key_features``),
        float32 also under autocast: the key features seen by query i are phi_hat_j exp(s_j - c_i) + floor."""
        with no_autocast(k.device.type):
            x = self.scaled(k)
            return per_key_features(x, self.projection.to(x.dtype), self.kind, key_padding_mask)

    def key_scales(self, k: torch.Tensor) -> torch.Tensor:
        """Each key's own scale s_j (b, h, l), detached: the max over features of its softmax logits
        w^T x - |x|^2/2, |x|^2/2 for trigonometric features, 0 for relu (no stabilizer)."""
        with no_autocast(k.device.type):
            x = self.scaled(k).detach()
            if self.kind == "relu":
                return x.new_zeros(x.shape[:-1])
            if self.kind == "softmax_trig":
                return 0.5 * (x * x).sum(dim=-1)
            return softmax_logits(x, self.projection.to(x.dtype), self.kind == "softmax_hyp").amax(dim=-1)

    # ---------------------------------------------------------------------------- fused paths
    # x: (B, C, d) rows already scaled by d^-1/4, w = ``directions(dtype)`` (m, d); a and b are
    # computed in place, and their chain rule is written out (the fused paths recompute them in
    # backward instead of saving them). Softmax: a_i = r (exp(w^T x_i - max_m w^T x_i) + eps),
    # b_j = r exp(w^T x_j - |x_j|^2/2 - s_j) with s_j the max over features (no floor: it is
    # ``fused_floor``, added outside); relu: relu(w^T x) + eps for both, s = 0.
    def directions(self, dtype: torch.dtype) -> torch.Tensor:
        """The m rows w of the fused paths, (m, d) in ``dtype``: W, or [W; -W] for hyperbolic features."""
        if self.kind not in FUSED_KINDS:
            raise ValueError(f"the fused paths support the kernels {FUSED_KINDS}, got {self.kind!r}")
        w = self.projection.to(dtype)
        return torch.cat([w, -w], dim=0) if self.kind == "softmax_hyp" else w

    def fused_floor(self) -> float:
        """The floor f the fused paths add to every real key feature outside ``fused_key``: r eps
        for the softmax kernels, 0 for relu (whose eps is inside its features)."""
        return 0.0 if self.kind == "relu" else self.feature_floor()

    def fused_query(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Query features a (B, C, m)."""
        z = torch.matmul(x, w.t())  # (B, C, m)
        if self.kind == "relu":
            return z.relu_().add_(self.eps)
        z.sub_(z.amax(dim=-1, keepdim=True) + 0.5 * math.log(w.shape[0]))
        return z.exp_().add_(self.fused_floor())

    def fused_query_grad(self, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        """dL/dx from dL/da (both consumed): (da * (a - f)) W, relu (da * [a > eps]) W."""
        if self.kind == "relu":
            dz = da.mul_(a > self.eps)  # a = relu(z) + eps
        else:
            dz = da.mul_(a.sub_(self.fused_floor()))  # d a / d z = a - f
        return torch.matmul(dz, w)

    def fused_key(
        self, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b (B, C, m), s (B, C)): softmax features at each key's own scale s (no floor), or relu
        features (s = 0). Padded keys (``mask`` (B, C), True at padding) get zero features."""
        z = torch.matmul(x, w.t())
        if self.kind == "relu":
            b, s = z.relu_().add_(self.eps), z.new_zeros(z.shape[:-1])
        else:
            z.sub_(0.5 * (x * x).sum(dim=-1, keepdim=True))
            s = z.amax(dim=-1)
            b = z.sub_(s.unsqueeze(-1) + 0.5 * math.log(w.shape[0])).exp_()
        if mask is not None:
            b.masked_fill_(mask.unsqueeze(-1), 0.0)
        return b, s

    def fused_key_grad(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """dL/dx from dL/db (db consumed): (db * b) W - x rowsum(db * b), relu (db * [b > eps]) W."""
        if self.kind == "relu":
            return torch.matmul(db.mul_(b > self.eps), w)  # padded keys: b = 0
        dz = db.mul_(b)  # d b / d z = b; z = w^T x - |x|^2/2
        return torch.matmul(dz, w).sub_(x * dz.sum(dim=-1, keepdim=True))
