"""Rotary positions (RoFormer): queries and keys rotated pair by pair by angles of their position
(``positions="rotary"`` in :class:`~protein_performer.model.performer.PerformerLM`)."""

from __future__ import annotations

import torch


def rotary_tables(
    length: int, dim_head: int, device, dtype, base: float = 10000.0, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles ``theta_{p,i} = p * base^(-2i/d)`` for the positions
    ``p = start .. start + length - 1``, each (l, d/2), computed in float32."""
    inv_freq = base ** (-torch.arange(0, dim_head, 2, device=device, dtype=torch.float32) / dim_head)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.einsum("l,f->lf", positions, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair ``(x_{2i}, x_{2i+1})`` of ``x: (b, h, l, d)`` by the angle of its position."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)
