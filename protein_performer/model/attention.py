"""Exact softmax attention, the baseline with the interface that ``favor.FavorAttention`` shares.

Interface of every attention core in this package (the model swaps them freely):
    forward(q, k, v, key_padding_mask=None) -> (b, h, l, d)
    attention_matrix(q, k, key_padding_mask=None) -> (b, h, l, l), rows sum to 1, causal when causal
    redraw(seed) -> None        (draws new random features; nothing to draw here)
and, for causal token-by-token decoding (``PerformerLM.step``):
    init_state(batch, heads, dim_v, device, dtype) -> state      (nothing fed yet)
    step(q_t, k_t, v_t, state) -> (out_t (b, h, 1, d), state)     (equals the causal forward's last row)
where the state is a frozen dataclass with ``nbytes()``: ``KVCache`` here, ``favor.FavorState``.
q, k, v are (batch, heads, length, dim_head); key_padding_mask is bool (batch, length), True where
the token is padding. Neither core has parameters, so weights move between exact and FAVOR+ models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class KVCache:
    """The state of exact attention after t tokens: the keys and values k, v (b, h, t, d) (grows)."""

    k: torch.Tensor
    v: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))


def check_key_padding_mask(key_padding_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    """The shared mask contract of every attention core: bool (batch, length), True at padding."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be bool (batch, length) = {(k.shape[0], k.shape[2])}, True at padding; "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    return key_padding_mask.to(k.device)


class SoftmaxAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V through ``F.scaled_dot_product_attention``.

    SDPA picks the flash / memory-efficient kernel where the device has one. Without a padding mask
    causal attention uses ``is_causal=True``; with one, a boolean (b, 1, l, l) mask (True = attend)
    combines both. A query with no real key to attend to gets a zero output.
    """

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal

    def extra_repr(self) -> str:
        return f"causal={self.causal}"

    def redraw(self, seed: int) -> None:
        """Exact attention has no random features: nothing to draw."""

    def _allowed(
        self, key_padding_mask: torch.Tensor | None, length_q: int, length_k: int, device
    ) -> torch.Tensor | None:
        """Boolean (b or 1, 1, l_q, l_k) mask, True where query i may attend to key j."""
        allowed = None
        if key_padding_mask is not None:
            allowed = (~key_padding_mask)[:, None, None, :]
        if self.causal:
            tri = torch.ones(length_q, length_k, dtype=torch.bool, device=device).tril()
            allowed = tri[None, None] if allowed is None else allowed & tri
        return allowed

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = check_key_padding_mask(key_padding_mask, k)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        allowed = self._allowed(mask, q.shape[2], k.shape[2], q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        # rows with no allowed key: make the output zero on every backend (some return NaN)
        empty = ~allowed.any(dim=-1, keepdim=True)  # (b, 1, l, 1)
        return out.masked_fill(empty, 0.0)

    @torch.no_grad()
    def attention_matrix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        block_rows: int | None = None,
    ) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)), masked, (b, h, l, l) in float32 (float64 for float64 input);
        computed in blocks of ``block_rows`` query rows (default: one block holds <= l x l numbers)."""
        mask = check_key_padding_mask(key_padding_mask, k)
        b, h, length, d = q.shape
        if block_rows is None:
            block_rows = max(1, length // (b * h))
        allowed = self._allowed(mask, length, k.shape[2], q.device)
        dtype = torch.promote_types(q.dtype, torch.float32)
        qf, kf = q.to(dtype), k.to(dtype)
        out = qf.new_empty(b, h, length, k.shape[2])
        for start in range(0, length, block_rows):
            stop = min(start + block_rows, length)
            scores = torch.einsum("bhld,bhkd->bhlk", qf[:, :, start:stop], kf) / math.sqrt(d)
            if allowed is not None:
                rows = allowed[:, :, start:stop] if allowed.shape[2] > 1 else allowed  # (b, 1, 1, l): pads only
                scores = scores.masked_fill(~rows, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[:, :, start:stop] = torch.nan_to_num(probs, nan=0.0)  # rows with no key: all -inf
        return out

    # ---------------------------------------------------------------------------- recurrent
    def init_state(
        self,
        batch: int,
        heads: int,
        dim_v: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty key/value cache: k and v (b, h, 0, d). It takes the dtype of the keys and values
        fed to :meth:`step` (``dtype`` only types the empty tensors)."""
        empty = torch.zeros(batch, heads, 0, dim_v, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    @torch.no_grad()
    def step(
        self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: KVCache
    ) -> tuple[torch.Tensor, KVCache]:
        """One causal step with the key/value cache: ``softmax(q_t K_{<=t}^T / sqrt(d)) V_{<=t}``.

        q_t, k_t, v_t: (b, h, 1, d) -> (out_t (b, h, 1, d), new cache with K, V (b, h, t + 1, d)).
        Scores and the softmax run in float32 (float64 for float64 input); O(t) work per token.
        """
        if not self.causal:
            raise RuntimeError("step() is for causal attention; build SoftmaxAttention(causal=True)")
        keys = torch.cat([state.k.to(k_t.dtype), k_t], dim=2)  # (b, h, t+1, d)
        values = torch.cat([state.v.to(v_t.dtype), v_t], dim=2)
        dtype = torch.promote_types(q_t.dtype, torch.float32)
        scores = torch.einsum("bhqd,bhkd->bhqk", q_t.to(dtype), keys.to(dtype)) / math.sqrt(q_t.shape[-1])
        out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), values.to(dtype))
        return out.to(v_t.dtype), KVCache(keys, values)
