"""The contact head on tiles: the head's logits summed over the ``layers x heads`` APC maps one row
tile at a time (:class:`tiles.ContactLogits`), so no (layers, heads, L, L) stack exists.

- :func:`dense_probabilities`: the (L, L) map exactly as ``ContactHead.predict`` makes it from
  ``contact_features`` (float16-rounded APC features, logits symmetrized, sigmoid, 0 on the
  diagonal), to float rounding;
- :func:`top_probabilities`: the k most probable pairs (i < j, j - i >= min_sep). One layer's
  features at a time: its term of the logits of the pairs i <= j (the upper part of each row tile,
  :meth:`LayerTiles.apc_upper`) is added to a :class:`TileSum` (in memory, or on disk for long
  sequences), whose rows are then streamed through the top k; the probability of pair (i, j) is
  that of its own logit (the map is symmetric up to rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from protein_performer.analysis.contacts.head import ContactHead
from protein_performer.analysis.maps import tiles
from protein_performer.analysis.maps.accumulate import TileSum
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.layer_features import attention_features
from protein_performer.model.performer import PerformerLM

log = logging.getLogger(__name__)

TILE = 256  # rows per tile: memory ~ layers x heads x TILE x L numbers at most per tile step


def layer_tiles(lm: PerformerLM, residues: np.ndarray, tile: int = TILE) -> list[tiles.LayerTiles]:
    """Every layer's :class:`tiles.LayerTiles` for one sequence (residue ids, no special tokens)."""
    return list(iter_layer_tiles(lm, residues, tile))


def iter_layer_tiles(lm: PerformerLM, residues: np.ndarray, tile: int = TILE) -> Iterator[tiles.LayerTiles]:
    """:func:`layer_tiles` one layer at a time (the model runs as they are consumed)."""
    if lm.training:
        raise RuntimeError("contacts need model.eval(): maps come from the model's fixed features")
    device = next(lm.parameters()).device
    ids, res = Tokenizer().frame(residues, bool(lm.config.causal))
    for _, f in attention_features(lm, torch.as_tensor(ids, device=device)[None]):
        scale = None if f["key_scale"] is None else f["key_scale"][0]
        feats = tiles.LayerFeatures(f["kind"], f["causal"], f["q"][0], f["k"][0], res, scale, f["floor"], f["scale"])
        yield tiles.LayerTiles(feats, tile)


def _logits(head: ContactHead) -> tiles.ContactLogits:
    v, c = head.affine()
    return tiles.ContactLogits(v.reshape(head.n_layers, head.n_heads), c)


def dense_probabilities(head: ContactHead, lts: list[tiles.LayerTiles], tile: int = TILE) -> np.ndarray:
    """(L, L) float32 contact probabilities, symmetric, 0 on the diagonal (``ContactHead.predict``)."""
    length = lts[0].length
    logits = _logits(head)
    z = np.empty((length, length), dtype=np.float64)
    for i0, i1 in tiles.tile_ranges(length, tile):
        z[i0:i1] = logits.tile(lts, i0, i1).cpu().numpy()
    z = 0.5 * (z + z.T)
    p = 1.0 / (1.0 + np.exp(-z))
    np.fill_diagonal(p, 0.0)
    return p.astype(np.float32)


def top_probabilities(
    head: ContactHead, lts: Iterable[tiles.LayerTiles], k: int, min_sep: int, tile: int = TILE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, p)``: the ``k`` most probable pairs i < j, j - i >= ``min_sep`` (0-based), most
    probable first (ties by (i, j)). ``lts``: every layer's tiles, in order (a list or
    :func:`iter_layer_tiles`: then one layer's features are held at a time); memory one layer's
    features, one tile and the logits' :class:`TileSum` (on disk for long sequences)."""
    logits = _logits(head)
    acc, n = None, 0
    try:
        for n, lt in enumerate(lts, 1):
            if acc is None:
                acc = TileSum(lt.length, tile, mirror=False, dtype=np.float64)
            for i0, i1 in tiles.tile_ranges(lt.length, tile):
                acc.add_upper(i0, i1, logits.layer_part(n - 1, lt, i0, i1, upper=True))
        if n != logits.weights.shape[0]:
            raise ValueError(f"{n} layers given, the weights have {logits.weights.shape[0]}")
        top = tiles.TopPairs(k, min_sep)
        for i0, i1 in tiles.tile_ranges(acc.length, tile):
            top.add(i0, torch.sigmoid(torch.from_numpy(acc.upper(i0, i1)) + logits.bias), col0=i0)
    finally:
        if acc is not None:
            acc.close()
    i, j, p = top.result()
    return i, j, p.astype(np.float32)
