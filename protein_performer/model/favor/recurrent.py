"""Causal FAVOR+ one token at a time (decoding): the state and the step.

    S_t = sum_{j<=t} k'_j v_j^T (m x e),  z_t = sum_{j<=t} k'_j (m),  out_t = q'_t S_t / q'_t z_t

with the softmax kernels' key features kept at the scale of the running stabilizer
c_t = max_{j<=t} s_j: when c grows, S and z are multiplied by exp(c_old - c_new) <= 1. The eps floor
f of every key feature is added at read time from sum_j v_j and the count t + 1, so it does not
depend on the stabilizer's history. ``step`` reproduces the last row of the causal ``forward`` on
all tokens so far (tests/model/test_favor.py::test_step_equals_causal_forward_on_prefix). Everything the
step needs of the attention core is its ``FeatureMap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protein_performer.model.favor.features import FeatureMap


@dataclass(frozen=True)
class FavorState:
    """The causal state after t + 1 tokens: S (b, h, m, e) and z (b, h, m) at scale exp(-c), the
    running key stabilizer c (b, h, 1, 1) (-inf: no key yet), and for the eps floor the sum of v
    (b, h, e) and the key count (b, h, 1). Constant size in t."""

    S: torch.Tensor
    z: torch.Tensor
    c: torch.Tensor
    v_sum: torch.Tensor
    count: torch.Tensor

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.c, self.v_sum, self.count))


def init_state(
    features: FeatureMap,
    batch: int,
    heads: int,
    dim_v: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> FavorState:
    """An empty state (nothing fed yet) for the feature map ``features``, on the device of its W by default."""
    device = features.projection.device if device is None else device

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device, dtype=dtype)

    return FavorState(
        S=zeros(batch, heads, features.nb_features, dim_v),
        z=zeros(batch, heads, features.nb_features),
        c=torch.full((batch, heads, 1, 1), float("-inf"), device=device, dtype=dtype),
        v_sum=zeros(batch, heads, dim_v),
        count=zeros(batch, heads, 1),
    )


@torch.no_grad()
def step(
    features: FeatureMap, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: FavorState
) -> tuple[torch.Tensor, FavorState]:
    """q_t, k_t, v_t (b, h, 1, d) -> (out_t (b, h, 1, d) in the state's dtype, the new state)."""
    dtype = state.S.dtype
    v_t = v_t.to(dtype)
    c_new = torch.maximum(state.c, features.key_scales(k_t).to(dtype)[..., None])  # (b, h, 1, 1)
    rescale = torch.exp(state.c - c_new)  # exp(-inf) = 0 on the first step
    k_prime = features.features(k_t, False, stabilizer=c_new, eps=0.0)  # (b, h, 1, m)
    S = state.S * rescale + torch.einsum("bhlm,bhle->bhme", k_prime, v_t)
    z = state.z * rescale[..., 0] + k_prime[:, :, 0]
    v_sum = state.v_sum + v_t[:, :, 0]
    count = state.count + 1
    floor = features.feature_floor()
    S_all = S + floor * v_sum.unsqueeze(2)  # every feature carries floor * sum(v)
    z_all = z + floor * count
    q_prime = features.features(q_t, True)[:, :, 0]  # (b, h, m)
    num = torch.einsum("bhm,bhme->bhe", q_prime, S_all)
    den = torch.einsum("bhm,bhm->bh", q_prime, z_all).unsqueeze(-1)
    out = num / torch.where(den == 0, torch.ones_like(den), den)
    return out.unsqueeze(2), FavorState(S, z, c_new, v_sum, count)
