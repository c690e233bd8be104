"""FAVOR+ random features and feature maps: one small pure function per equation (see the package docstring)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
