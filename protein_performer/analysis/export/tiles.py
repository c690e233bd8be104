"""Export, the maps of one record computed in row tiles from each layer's features
(:mod:`protein_performer.analysis.maps.tiles`), never a float32 (layers, heads, L, L) stack.

What a record stores (maps.h5 layout: :mod:`protein_performer.analysis.maps.format`):

- ``attentions`` / ``apc`` (dense, float16): each layer assembled from tiles in float16 and written
  as one chunk, or, above ``DENSE_LAYER_MAX_BYTES`` per layer, chunked by ``tile`` rows and written
  band by band as the tiles come;
- ``apc_mean`` (float16 (n, L, L), chunked by ``tile`` rows): the mean over the selected heads of
  the APC maps, per selected layer (``reduce="layer"``, n = layers) or also over the layers
  (``reduce="all"``, n = 1: summed in a float32 (L, L) :class:`~protein_performer.analysis.maps.accumulate.TileSum`,
  in memory up to ``SUM_MAX_BYTES``, on disk in the temporary directory above it);
- ``contacts/pairs`` int32 (layers, heads, k, 2) and ``contacts/values`` float32 (layers, heads,
  k): the top k = round(``top`` x L) pairs (i < j, j - i >= ``min_sep``) of every selected APC
  map, by value.

Without dense maps and per-layer means (e.g. ``include=[apc_mean,contacts] reduce=all``) the tiles
are the upper part of the rows only (:meth:`LayerTiles.apc_upper`: the pairs i <= j, the sum
mirrored), half the work (a quarter for causal models).

:class:`MapSelection` holds the options (``layers``, ``heads``: None for all).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from protein_performer.analysis.export.model import ExportError, run_sequence
from protein_performer.analysis.maps import tiles
from protein_performer.analysis.maps.accumulate import TileSum
from protein_performer.analysis.maps.writer import LayerRecord
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.layer_features import kernel_features
from protein_performer.model.performer import PerformerLM

log = logging.getLogger(__name__)

REDUCE = ("layer", "all")
TILED = ("apc_mean", "contacts")  # include options that only the tiled path writes
# reduce=all: the layers' head-mean APC maps are summed in one float32 (L, L) array in memory up to
# this size (L <= 8192), in a temporary file above it
SUM_MAX_BYTES = 256 << 20
# dense maps (attentions / apc) of one layer above this size are chunked by ``tile`` rows and written
# band by band (never a whole layer in memory); below it one chunk per layer, as always
DENSE_LAYER_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class MapSelection:
    """Which maps an export computes and how it reduces them (see the module docstring)."""

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    reduce: str = "layer"
    top: float = 1.0
    min_sep: int = 6
    tile: int = 256

    @classmethod
    def of(cls, value: MapSelection | dict | None) -> MapSelection:
        """A selection from itself, a dict of its fields (lists for layers / heads) or None (defaults)."""
        if isinstance(value, MapSelection):
            return value
        d = dict(value or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ExportError(f"unknown map selection options {unknown} (known: {sorted(cls.__dataclass_fields__)})")
        for key in ("layers", "heads"):
            if d.get(key) is not None:
                d[key] = tuple(int(i) for i in d[key])
        casts = {"reduce": str, "top": float, "min_sep": int, "tile": int}
        sel = cls(**{k: casts[k](v) if k in casts else v for k, v in d.items()})
        if sel.reduce not in REDUCE:
            raise ExportError(f"reduce must be one of {REDUCE}, got {sel.reduce!r}")
        if not sel.top > 0 or sel.min_sep < 1 or sel.tile < 1:
            raise ExportError(f"top must be > 0, min_sep >= 1 and tile >= 1, got {sel.top}, {sel.min_sep}, {sel.tile}")
        return sel

    def is_default(self) -> bool:
        return self == MapSelection()

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def resolve(self, depth: int, heads: int) -> tuple[list[int], list[int]]:
        """The selected layers and heads, sorted, checked against the model's ``depth`` x ``heads``."""
        out = []
        for name, chosen, n in (("layers", self.layers, depth), ("heads", self.heads, heads)):
            idx = list(range(n)) if chosen is None else sorted(set(chosen))
            if not idx or idx[0] < 0 or idx[-1] >= n:
                raise ExportError(f"{name}={list(chosen or [])}: the model has {name} 0..{n - 1}")
            out.append(idx)
        return out[0], out[1]

    def record_attrs(self, depth: int, n_heads: int) -> dict:
        """The record's ``map_layers`` / ``map_heads`` attributes where the selection is not all of them."""
        layers, heads = self.resolve(depth, n_heads)
        out = {}
        if len(layers) != depth:
            out["map_layers"] = np.asarray(layers, dtype=np.int32)
        if len(heads) != n_heads:
            out["map_heads"] = np.asarray(heads, dtype=np.int32)
        return out

    def k(self, length: int) -> int:
        """Pairs kept per map: round(top x L), at most the pairs with j - i >= min_sep."""
        pairs = max(0, length - self.min_sep) * max(0, length - self.min_sep + 1) // 2
        return min(max(1, round(self.top * length)), pairs)


def extras(inc: tuple[str, ...], sel: MapSelection, layers: list[int], heads: list[int], length: int) -> dict:
    """The datasets ``begin_layers`` creates for the tiled outputs: name -> shape, dtype, chunks, attrs."""
    out = {}
    attrs = {"layers": np.asarray(layers, dtype=np.int32), "heads": np.asarray(heads, dtype=np.int32)}
    if "apc_mean" in inc:
        n = len(layers) if sel.reduce == "layer" else 1
        out["apc_mean"] = dict(
            shape=(n, length, length),
            dtype=np.float16,
            chunks=(1, min(sel.tile, length), length),
            compress=True,
            attrs={**attrs, "reduce": sel.reduce},
        )
    if "contacts" in inc:
        k = sel.k(length)
        top = {**attrs, "min_sep": sel.min_sep, "top": sel.top}
        out["contacts/pairs"] = dict(shape=(len(layers), len(heads), k, 2), dtype=np.int32, compress=True, attrs=top)
        out["contacts/values"] = dict(shape=(len(layers), len(heads), k), dtype=np.float32, compress=True, attrs=top)
    return out


def extra_bytes(specs: dict) -> int:
    """An upper bound of the bytes of the :func:`extras` datasets (uncompressed)."""
    return sum(int(np.prod(kw["shape"])) * np.dtype(kw["dtype"]).itemsize for kw in specs.values())


def _features(lm: PerformerLM, layer: int, x: torch.Tensor, res: slice, heads: list[int]) -> tiles.LayerFeatures:
    """The layer's :class:`tiles.LayerFeatures` for the one sequence in ``x`` (1, T, dim)."""
    attn = lm.blocks[layer].attn
    f = kernel_features(attn.kernel, *attn.queries_keys(lm.blocks[layer].ln1(x)))
    scale = None if f["key_scale"] is None else f["key_scale"][0]
    feats = tiles.LayerFeatures(f["kind"], f["causal"], f["q"][0], f["k"][0], res, scale, f["floor"], f["scale"])
    return feats if len(heads) == attn.heads else feats.select(heads)


def dense_rows(inc: tuple[str, ...], sel: MapSelection, n_heads: int, length: int) -> int | None:
    """Rows per chunk of the dense maps: ``tile`` where one layer's maps would pass
    ``DENSE_LAYER_MAX_BYTES`` (they are then written band by band), None (one chunk per layer) below."""
    dense = "attentions" in inc or "apc" in inc
    big = 2 * n_heads * length * length > DENSE_LAYER_MAX_BYTES
    return sel.tile if dense and big and sel.tile < length else None


def _layer_tiles(record: LayerRecord, n: int, lt: tiles.LayerTiles, inc: tuple[str, ...], sel: MapSelection, out):
    """Layer ``n`` of the selection: dense maps (band by band into the file when the record is
    chunked by rows, else assembled in float16), its head-mean APC rows (written with
    ``reduce="layer"``, added to ``out["sum"]`` with ``reduce="all"``), its top pairs (appended
    to ``out["top"]``). Without dense maps or per-layer means only the upper part of each row tile
    is computed."""
    h, L = lt.heads, lt.length
    by_rows = record.band < L
    want = [w for w in ("attentions", "apc") if w in inc]
    dense = {w: np.empty((h, L, L), dtype=np.float16) for w in want} if not by_rows else {}
    top = tiles.TopPairs(sel.k(L), sel.min_sep, batch=h) if "contacts" in inc else None
    upper = not want and not ("apc_mean" in inc and sel.reduce == "layer")
    for i0, i1 in tiles.tile_ranges(L, record.band if by_rows else sel.tile):
        if upper:
            apc = lt.apc_upper(i0, i1)
            if top is not None:
                top.add(i0, apc, col0=i0)
            if out.get("sum") is not None:
                out["sum"].add_upper(i0, i1, apc.mean(0))
            continue
        rows = {"attentions": lt.map_rows(i0, i1).cpu().numpy()} if "attentions" in inc else {}
        apc = lt.apc_rows(i0, i1) if ("apc" in inc or top is not None or "apc_mean" in inc) else None
        if "apc" in inc:
            rows["apc"] = apc.cpu().numpy()
        if top is not None:
            top.add(i0, apc)
        if "apc_mean" in inc and sel.reduce == "layer":
            record.write_extra("apc_mean", (n, slice(i0, i1)), apc.mean(0).cpu().numpy())
        elif out.get("sum") is not None:
            out["sum"].add_rows(i0, i1, apc.mean(0))
        if by_rows:
            record.write_rows(i0, rows.get("attentions"), rows.get("apc"))
        for w, arr in rows.items() if not by_rows else ():
            dense[w][:, i0:i1] = arr
    if not by_rows:
        record.write_stored_layer(dense.get("attentions"), dense.get("apc"))  # counts the layer also without maps
    if top is not None:
        out["top"].append(top.result())


def write_tiled_record(
    lm: PerformerLM, record: LayerRecord, residues: np.ndarray, inc: tuple[str, ...], sel: MapSelection
) -> torch.Tensor | None:
    """Run one sequence through ``lm`` and write the record's maps from tiles (one layer's features
    at a time). Returns the final representation (L, dim) when ``mean`` / ``per_token`` are asked for."""
    layers, heads = sel.resolve(len(lm.blocks), int(lm.config.heads))
    want_repr = "mean" in inc or "per_token" in inc
    ids, res = Tokenizer().frame(residues, bool(lm.config.causal))
    L = len(residues)
    all_mean = "apc_mean" in inc and sel.reduce == "all"
    out = {"top": [], "sum": TileSum(L, sel.tile, max_bytes=SUM_MAX_BYTES) if all_mean else None}
    rep = None
    try:
        with torch.no_grad():
            for layer, x in enumerate(lm.hidden_states(torch.as_tensor(ids)[None])):
                if layer == len(lm.blocks):
                    rep = x[0, res]
                elif layer in layers:
                    lt = tiles.LayerTiles(_features(lm, layer, x, res, heads), sel.tile)
                    _layer_tiles(record, layers.index(layer), lt, inc, sel, out)
                if layer >= layers[-1] and not want_repr:
                    break
        for i0, i1 in tiles.tile_ranges(L, sel.tile) if all_mean else ():
            record.write_extra("apc_mean", (0, slice(i0, i1)), out["sum"].rows(i0, i1) / len(layers))
    finally:
        if out["sum"] is not None:
            out["sum"].close()
    if "contacts" in inc:
        pairs = np.array([[np.stack([i, j], -1) for i, j, _ in per] for per in out["top"]], dtype=np.int32)
        values = np.array([[v for _, _, v in per] for per in out["top"]], dtype=np.float32)
        record.write_extra("contacts/pairs", (), pairs)
        record.write_extra("contacts/values", (), values)
    return rep


def write_record(lm: PerformerLM, record: LayerRecord, residues: np.ndarray, inc: tuple[str, ...], sel: MapSelection):
    """Run one sequence through ``lm`` into ``record``: the maps it keeps (:func:`write_tiled_record`),
    then the final-layer embeddings."""
    want_repr = "mean" in inc or "per_token" in inc
    if any(w in inc for w in ("attentions", "apc", *TILED)):
        rep = write_tiled_record(lm, record, residues, inc, sel)
    else:
        rep = run_sequence(lm, residues, None, want_repr)
    if want_repr:
        rep = rep.float().cpu().numpy()  # (L, dim)
        record.add_embeddings(
            mean=rep.mean(0) if "mean" in inc else None, per_token=rep if "per_token" in inc else None
        )
