"""Pure map math on (..., L, L) attention stacks, below both ``contacts`` and ``maps`` (reader, writer).

- symmetrize: ``S = A + A^T`` over the last two axes.
- apc (average product correction, Dunn et al. 2008, as in ESM):
  ``APC(S)_ij = S_ij - (sum_k S_ik)(sum_k S_kj) / sum_kl S_kl``.
- apc_maps: ``APC(A + A^T)`` of every map, computed in float32 (what maps.h5 stores as ``apc``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["apc", "apc_maps", "symmetrize"]


def symmetrize(a: np.ndarray) -> np.ndarray:
    """``A + A^T`` over the last two axes of a (..., L, L) array."""
    a = np.asarray(a)
    return a + np.swapaxes(a, -1, -2)


def apc(a: np.ndarray) -> np.ndarray:
    """Average product correction over the last two axes:
    ``A_ij - (sum_k A_ik)(sum_k A_kj) / sum_kl A_kl`` (Dunn et al. 2008, as in ESM)."""
    a = np.asarray(a)
    a = a.astype(np.float64 if a.dtype == np.float64 else np.float32, copy=False)
    rows = a.sum(-1, keepdims=True)
    cols = a.sum(-2, keepdims=True)
    total = a.sum((-1, -2), keepdims=True)
    total = np.where(total == 0, 1.0, total)
    return a - rows * cols / total


def apc_maps(attentions: np.ndarray) -> np.ndarray:
    """``apc(symmetrize(A))`` for every map of a (..., L, L) stack, computed in float32."""
    return apc(symmetrize(np.asarray(attentions, dtype=np.float32)))
