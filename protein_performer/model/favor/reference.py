"""The definitions, written out: O(L^2) explicit-matrix references for readers and tests.

    exact softmax attention     softmax(Q K^T / sqrt(d) + mask) V
    FAVOR+ (bidirectional)      D^-1 (Q' K'^T) V,  D = diag(Q' K'^T 1)
    FAVOR+ (causal)             row i uses the key features of the prefix 0..i alone (its own
                                stabilizer c_i = max_{j<=i} s_j), zero beyond i
    causal product              O_i = sum_{j<=i} ((q'_i . k'_j) exp(s_j - c_i) + f sum(q'_i)) u_j

Every function is differentiable by autograd, so gradients of the fast paths (``causal.py``,
``scan.py``, ``triton_kernels.py``) are checked against these (tests/test_favor.py,
tests/test_favor_scan.py, tests/test_favor_triton.py). Quadratic in L: for small inputs only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from protein_performer.model.favor.module import FavorAttention


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


def favor_attention(
    fa: FavorAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """FAVOR+ of module ``fa`` as the explicit matrix D^-1 (Q' K'^T) times V. Causal: row i is
    computed from the features of keys 0..i only, so no later key can reach it."""
    q_prime = fa.features(q, True)
    if not fa.causal:
        scores = q_prime @ fa.features(k, False, key_padding_mask).transpose(-1, -2)
    else:
        length, rows = k.shape[2], []
        for i in range(length):
            mask_i = None if key_padding_mask is None else key_padding_mask[:, : i + 1]
            k_prefix = fa.features(k[:, :, : i + 1], False, mask_i)
            rows.append(F.pad(q_prime[:, :, i : i + 1] @ k_prefix.transpose(-1, -2), (0, length - i - 1)))
        scores = torch.cat(rows, dim=2)
    return (scores / scores.sum(-1, keepdim=True)) @ v


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
