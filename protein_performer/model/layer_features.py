"""Each layer's attention as features, never as a map: what ``attention_matrix`` is made of.

``attention_features(model, tokens)`` yields ``(layer, features)`` beside
``PerformerLM.attention_maps`` (same layers, same pass, one layer at a time), for analysis that
works in tiles (:mod:`protein_performer.analysis.maps.tiles`) and so never holds an (l, l) map.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from protein_performer.model.attention import SoftmaxAttention
from protein_performer.model.performer import PerformerLM


def kernel_features(kernel: nn.Module, q: torch.Tensor, k: torch.Tensor) -> dict[str, Any]:
    """The inputs of ``kernel.attention_matrix(q, k)`` (no padding), without the (b, h, l, l) map.

    FAVOR+: ``kind="favor"``, ``q`` = Q' (b, h, l, m) and ``k`` = K', or for a causal softmax-type
    kernel the per-key features k^ with their scales ``key_scale`` (b, h, l) and the ``floor``
    (``FavorAttention.causal_key_features``); the map is ``D^-1 Q' K'^T`` (causally masked).
    Exact: ``kind="exact"``, ``q``, ``k`` (at least float32) and ``scale`` = 1/sqrt(d); the map is
    ``softmax(q k^T scale)``. ``causal`` for both.
    """
    out: dict[str, Any] = {"causal": bool(kernel.causal), "key_scale": None, "floor": 0.0, "scale": 1.0}
    if isinstance(kernel, SoftmaxAttention):
        dtype = torch.promote_types(q.dtype, torch.float32)
        return {**out, "kind": "exact", "q": q.to(dtype), "k": k.to(dtype), "scale": q.shape[-1] ** -0.5}
    out.update(kind="favor", q=kernel.features(q, True))
    if kernel.causal and kernel.kind != "relu":  # per-query stabilizer, as in forward
        out["k"], out["key_scale"] = kernel.causal_key_features(k)
        out["floor"] = kernel.feature_floor()
    else:
        out["k"] = kernel.features(k, False)
    return out


@torch.no_grad()
def attention_features(
    model: PerformerLM, tokens: torch.Tensor, layers: Iterable[int] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(layer, kernel_features(...))`` for ``layers`` (default: all) of ``model`` on ``tokens``
    (b, l), in order and one layer at a time; blocks after the last one asked for are not run."""
    for layer, x in model.layer_inputs(tokens, layers=layers):
        attn = model.blocks[layer].attn
        yield layer, kernel_features(attn.kernel, *attn.queries_keys(model.blocks[layer].ln1(x)))
