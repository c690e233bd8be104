"""Causal FAVOR+ one token at a time (decoding): the state and the step.

    S_t = sum_{j<=t} k'_j v_j^T (m x e),  z_t = sum_{j<=t} k'_j (m),  out_t = q'_t S_t / q'_t z_t

with the softmax kernels' key features kept at the scale of the running stabilizer
c_t = max_{j<=t} s_j: when c grows, S and z are multiplied by exp(c_old - c_new) <= 1. The eps floor
f of every key feature is added at read time from sum_j v_j and the count t + 1, so it does not
depend on the stabilizer's history. ``step`` reproduces the last row of the causal ``forward`` on
all tokens so far (tests/test_favor.py::test_step_equals_causal_forward_on_prefix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from protein_performer.model.favor.features import softmax_logits

if TYPE_CHECKING:
    from protein_performer.model.favor.module import FavorAttention


def init_state(
    fa: FavorAttention,
    batch: int,
    heads: int,
    dim_v: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """An empty state: S (b, h, m, e) and z (b, h, m) at scale exp(-c), the running key stabilizer
    c (b, h, 1, 1) (-inf: no key yet), and for the eps floor the sum of v (b, h, e) and the key count."""
    device = fa.projection.device if device is None else device

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device, dtype=dtype)

    return {
        "S": zeros(batch, heads, fa.nb_features, dim_v),
        "z": zeros(batch, heads, fa.nb_features),
        "c": torch.full((batch, heads, 1, 1), float("-inf"), device=device, dtype=dtype),
        "v_sum": zeros(batch, heads, dim_v),
        "count": zeros(batch, heads, 1),
    }


def running_stabilizer(fa: FavorAttention, k_scaled: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c_new = max(c, max over features of the new key's logits); 0 for relu (no stabilizer)."""
    if fa.kernel in ("softmax", "softmax_hyp"):
        logits = softmax_logits(k_scaled, fa.projection.to(k_scaled.dtype), fa.kernel == "softmax_hyp")
    elif fa.kernel == "softmax_trig":
        logits = 0.5 * (k_scaled * k_scaled).sum(dim=-1, keepdim=True)
    else:
        return torch.zeros_like(c)
    return torch.maximum(c, logits.amax(dim=(-2, -1), keepdim=True))


@torch.no_grad()
def step(
    fa: FavorAttention, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: dict
) -> tuple[torch.Tensor, dict]:
    """q_t, k_t, v_t (b, h, 1, d) -> (out_t (b, h, 1, d) in v_t's dtype, the new state); float32 inside."""
    dtype = state["S"].dtype
    v_t = v_t.to(dtype)
    k_scaled = k_t.to(dtype) * fa.dim_head**-0.25
    c_new = running_stabilizer(fa, k_scaled, state["c"])
    rescale = torch.exp(state["c"] - c_new)  # (b, h, 1, 1); exp(-inf) = 0 on the first step
    k_prime = fa.features(k_t, False, stabilizer=c_new, eps=0.0)  # (b, h, 1, m)
    S = state["S"] * rescale + torch.einsum("bhlm,bhle->bhme", k_prime, v_t)
    z = state["z"] * rescale[..., 0] + k_prime[:, :, 0]
    v_sum = state["v_sum"] + v_t[:, :, 0]
    count = state["count"] + 1
    floor = fa.feature_floor()
    S_all = S + floor * v_sum.unsqueeze(2)  # every feature carries floor * sum(v)
    z_all = z + floor * count
    q_prime = fa.features(q_t, True)[:, :, 0]  # (b, h, m)
    num = torch.einsum("bhm,bhme->bhe", q_prime, S_all)
    den = torch.einsum("bhm,bhm->bh", q_prime, z_all).unsqueeze(-1)
    out = num / torch.where(den == 0, torch.ones_like(den), den)
    return out.unsqueeze(2), {"S": S, "z": z, "c": c_new, "v_sum": v_sum, "count": count}
