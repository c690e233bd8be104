"""The definitions, written out: O(L^2) explicit-matrix references for readers and tests.

The tests' oracle: it takes plain tensors (q, k, v, the projection W, the kernel's name, causal, eps)
and imports nothing from the code it checks, only torch and math. Every feature map below is
written from the paper's equations (Choromanski et al., ICLR 2021; ../shared/docs/PAPER.md) with
the conventions of this project, in float64, one dense (l, l) matrix at a time.

    exact softmax attention     softmax(Q K^T / sqrt(d) + mask) V
    FAVOR+                      D^-1 (Q' K'^T) V,  D = diag(Q' K'^T 1),  Q' = phi(Q d^-1/4), K' = phi(K d^-1/4);
                                causal: row i sees the keys j <= i only; padded keys: seen by no row
    causal product              O_i = sum_{j<=i} ((q'_i . k'_j) exp(s_j - c_i) + f sum(q'_i)) u_j

Feature maps of x (q or k times d^-1/4), W (r, d) with rows w_l as the module stores it:

    softmax        phi(x)_l = exp(w_l^T x - |x|^2/2) / sqrt(m),  m = r
    softmax_hyp    the same over the 2r rows [W; -W] (exp(+w^T x) and exp(-w^T x)),  m = 2r
    softmax_trig   phi(x) = exp(|x|^2/2) [sin(W x), cos(W x)] / sqrt(r),  m = 2r (no floor)
    relu           phi(x) = relu(W x) + eps  (no 1/sqrt(m): with the floor eps it would not cancel)

Stabilizer and floor (they decide what eps means, so they are part of the definition): a softmax
feature is phi(x) exp(-c) + eps / sqrt(m), c a constant for autograd (detached):
    query x        c = max_l (w_l^T x - |x|^2/2): the |x|^2/2 cancels, phi(x) exp(-c) = exp(W x - max_l w_l^T x) / sqrt(m)
    key j, row i   c_i = max over the keys row i sees (and over l) of w_l^T k_j - |k_j|^2/2
so a causal row i depends on no later key, and a bidirectional row uses one c for all real keys.
Trigonometric features have no floor, so their scales cancel in D^-1: queries drop exp(|q|^2/2),
keys get exp(|k_j|^2/2 - c_i) with c_i the max of |k_j|^2/2 over the keys row i sees. A row that
sees no key gets 0.

Every function is differentiable by autograd, so the fast paths (``causal.py``, ``scan.py``,
``triton_kernels.py``) and their gradients are checked against these (tests/model/test_favor.py,
tests/model/test_favor_reference.py, tests/model/test_attention_exact.py). Quadratic in L (the softmax keys
are even (l, l, m)): for small inputs only.
"""

from __future__ import annotations

import math

import torch

_SOFTMAX_KERNELS = ("softmax", "softmax_hyp")


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V with a causal mask and/or padded keys (b, l) left out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    length = q.shape[2]
    if causal:
        allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


def _seen_keys(
    length_q: int, length_k: int, causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(b or 1, 1, l_q, l_k) bool: row i sees key j (j real and, causal, j <= i)."""
    seen = torch.ones(length_q, length_k, dtype=torch.bool, device=device)
    if causal:
        seen = seen.tril()
    seen = seen[None, None]
    if key_padding_mask is not None:
        seen = seen & ~key_padding_mask[:, None, None, :]
    return seen


def _row_max(s: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """c_i = max of s_j (b, h, l_k) over the keys row i sees, (b, h, l_q), detached; 0 if none."""
    c = s.detach()[..., None, :].masked_fill(~seen, float("-inf")).amax(-1)
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def _softmax_scores(xq, xk, w, eps, seen):
    """q'_i . k'_j with positive softmax features, key j stabilized by row i's c_i: (b, h, l, l)."""
    m = w.shape[0]
    wq, wk = xq @ w.T, xk @ w.T  # (b, h, l, m)
    # phi(q) exp(-c), c = max_l (w_l^T q - |q|^2/2): the |q|^2/2 cancels, the max is a constant
    q_feat = (torch.exp(wq - wq.detach().amax(-1, keepdim=True)) + eps) / math.sqrt(m)
    k_logits = wk - 0.5 * (xk * xk).sum(-1, keepdim=True)  # log(sqrt(m) phi(k))
    c = _row_max(k_logits.amax(-1), seen)  # (b, h, l_q)
    # key j as seen by row i: (b, h, i, j, m); keys row i does not see get no feature (no floor)
    exponent = (k_logits[:, :, None] - c[..., None, None]).masked_fill(~seen[..., None], float("-inf"))
    k_feat = (torch.exp(exponent) + eps * seen[..., None].to(exponent.dtype)) / math.sqrt(m)
    return torch.einsum("bhim,bhijm->bhij", q_feat, k_feat)


def _trig_scores(xq, xk, w, seen):
    """q'_i . k'_j with trigonometric features (queries without their row factor exp(|q|^2/2))."""
    wq, wk = xq @ w.T, xk @ w.T
    r = w.shape[0]
    q_feat = torch.cat([torch.sin(wq), torch.cos(wq)], -1) / math.sqrt(r)
    k_trig = torch.cat([torch.sin(wk), torch.cos(wk)], -1) / math.sqrt(r)
    half_sq = 0.5 * (xk * xk).sum(-1)  # (b, h, l_k)
    c = _row_max(half_sq, seen)
    exponent = (half_sq[:, :, None, :] - c[..., None]).masked_fill(~seen, float("-inf"))
    return (q_feat @ k_trig.transpose(-1, -2)) * torch.exp(exponent)


def attention_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    projection: torch.Tensor,
    kernel: str,
    causal: bool,
    eps: float,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FAVOR+ attention matrix D^-1 Q' K'^T, (b, h, l_q, l_k) float64: row i over the keys it
    sees (causal: j <= i; padded keys never), each row summing to 1 (0 for a row that sees no key).
    q, k: (b, h, l, d); projection: W (r, d); kernel: "softmax", "softmax_hyp", "softmax_trig" or
    "relu"; eps: the feature floor (unused by "softmax_trig"); key_padding_mask: (b, l_k), True = pad."""
    d = q.shape[-1]
    xq, xk = q.double() * d**-0.25, k.double() * d**-0.25  # the data normalizer: 1/sqrt(d) in q'.k'
    w = projection.double()
    seen = _seen_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if kernel in _SOFTMAX_KERNELS:
        scores = _softmax_scores(xq, xk, torch.cat([w, -w]) if kernel == "softmax_hyp" else w, eps, seen)
    elif kernel == "softmax_trig":
        scores = _trig_scores(xq, xk, w, seen)
    elif kernel == "relu":
        q_feat, k_feat = torch.relu(xq @ w.T) + eps, torch.relu(xk @ w.T) + eps
        scores = (q_feat @ k_feat.transpose(-1, -2)).masked_fill(~seen, 0.0)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    den = scores.sum(-1, keepdim=True)
    return scores / torch.where(den == 0, torch.ones_like(den), den)


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel: str,
    causal: bool,
    eps: float,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAVOR+ as the explicit matrix D^-1 (Q' K'^T) times V, float64 (``attention_matrix``)."""
    return attention_matrix(q, k, projection, kernel, causal, eps, key_padding_mask) @ v.double()


def causal_product(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    values: torch.Tensor,
    key_scale: torch.Tensor | None = None,
    query_scale: torch.Tensor | None = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """sum_{j <= i} ((q'_i . k'_j) exp(s_j - c_i) + f sum(q'_i)) u_j as one explicit masked matrix
    (the unnormalised product that ``causal.causal_product`` computes in chunks)."""
    scores = q_feat @ k_feat.transpose(-1, -2)
    if key_scale is not None:
        scores = scores * torch.exp(key_scale[..., None, :] - query_scale[..., :, None])
    return (scores + floor * q_feat.sum(-1, keepdim=True)).tril() @ values
