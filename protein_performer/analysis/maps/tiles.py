"""Attention analysis in row tiles: maps, APC, head means, top pairs and contact logits of one
layer from its features, never an L x L x heads array (torch + numpy only; a layer at a time).

One sequence of T tokens, its L residues at token positions ``residues`` (special tokens' rows and
columns are dropped, as in ``PerformerLM.attention_maps``). ``A`` below is the L x L residue map.

FAVOR+ (``kind="favor"``): ``A_ij = num_ij / D_i`` with ``num_ij = q'_i . k'_j`` over the allowed
keys (j <= i when causal). With a causal softmax kernel the keys carry per-key scales s_j and the
running stabilizer c_i = max_{j<=i} s_j (``FavorAttention.causal_key_features``):
``num_ij = q'_i . k^_j exp(s_j - c_i) + floor sum(q'_i)``. ``D_i = sum_{j allowed} num_ij`` runs
over ALL tokens, special ones included, so rows of the full map sum to 1; the residue map's rows
do not. Row and column sums of ``A`` come in linear time from the features:

    r_i = sum_{j in res, j allowed} num_ij / D_i       (prefix sums over keys when causal)
    c_j = sum_{i in res, j allowed for i} num_ij / D_i (suffix sums over queries when causal)

the causal softmax ones by a chunked scan whose every factor exp(s_j - c_i) is <= 1.

Exact (``kind="exact"``): ``A_ij = exp(q_i . k_j * scale - lse_i)``; a first pass over row tiles
gives the per-row logsumexp over all allowed tokens, a second the column sums.

From those, with ``S = A + A^T`` (row sums ``rs = r + c``, total ``sum(rs)``), as
:mod:`protein_performer.analysis.maps.ops` defines them::

    APC(S)_ij = S_ij - rs_i rs_j / total

:class:`LayerTiles` gives row tiles of A, S and APC(S) per head; :class:`TopPairs` keeps the top k
pairs (i < j, j - i >= min_sep) of a map fed tile by tile; :func:`tile_ranges` cuts L into tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

KINDS = ("favor", "exact")
SCAN_CHUNK = 256  # rows of the causal scans' intra-chunk blocks (h x chunk x chunk numbers)


def tile_ranges(length: int, tile: int) -> Iterator[tuple[int, int]]:
    """``(i0, i1)`` row ranges of at most ``tile`` rows covering ``0..length``."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    for i0 in range(0, length, tile):
        yield i0, min(i0 + tile, length)


@dataclass
class LayerFeatures:
    """One layer's attention for one sequence, as the model computes it (batch axis dropped).

    favor: ``q`` = Q' (h, T, m) and ``k`` = K' (h, T, m), or with ``key_scale`` (h, T) the causal
    softmax key features k^ at their own scales and ``floor`` the feature floor. exact: ``q``, ``k``
    (h, T, d) and ``scale`` (1/sqrt(d)). ``residues``: the token positions of the residues.
    """

    kind: str
    causal: bool
    q: torch.Tensor
    k: torch.Tensor
    residues: slice
    key_scale: torch.Tensor | None = None
    floor: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.q.dim() != 3 or self.q.shape != self.k.shape:
            raise ValueError(f"q and k must both be (heads, tokens, features), got {self.q.shape}, {self.k.shape}")
        start, stop, step = self.residues.indices(self.q.shape[1])
        if step != 1 or stop <= start:
            raise ValueError(f"residues must be a non-empty contiguous slice of the tokens, got {self.residues}")
        self.residues = slice(start, stop)

    def select(self, heads: list[int]) -> LayerFeatures:
        """The same layer restricted to ``heads``."""
        idx = torch.as_tensor(list(heads), dtype=torch.long, device=self.q.device)
        scale = None if self.key_scale is None else self.key_scale[idx]
        return LayerFeatures(
            self.kind, self.causal, self.q[idx], self.k[idx], self.residues, scale, self.floor, self.scale
        )


def _causal_mask(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(r, c) bool: key ``cols[j]`` is allowed for query ``rows[i]`` (j <= i)."""
    return cols[None, :] <= rows[:, None]


class LayerTiles:
    """Row tiles of one layer's residue maps A, S = A + A^T and APC(S) per head, from its features.

    The normaliser (FAVOR+: D; exact: the row logsumexp) and the residue row / column sums are
    computed once, in linear time for FAVOR+ (two passes over row tiles for exact attention);
    every tile then costs O(heads x rows x L).
    """

    def __init__(self, features: LayerFeatures, tile: int = 256):
        self.f = features
        self.tile = int(tile)
        self.heads, self.tokens = features.q.shape[:2]
        self.length = features.residues.stop - features.residues.start
        self._pos = torch.arange(self.tokens, device=features.q.device)
        self._res = self._pos[features.residues]
        self._c = None  # causal softmax FAVOR+: the running max of the key scales (h, T)
        if features.kind == "favor" and features.causal and features.key_scale is not None:
            self._c = torch.cummax(features.key_scale, dim=-1).values
        if features.kind == "favor":
            self.norm = self._favor_normaliser()
            self.row_sums, self.col_sums = self._favor_sums()
        else:
            self.norm = self._exact_lse()
            self.row_sums, self.col_sums = self._exact_sums()
        self.sym_sums = self.row_sums + self.col_sums  # (h, L): row (= column) sums of S
        total = self.sym_sums.sum(-1, keepdim=True)
        self.total = torch.where(total == 0, torch.ones_like(total), total)

    # ------------------------------------------------------------------ numerators of the map
    def _num(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(h, r, c): the unnormalised weights of queries ``rows`` on keys ``cols`` (token positions),
        0 where causally masked; for exact attention already exp(score - lse) (i.e. A itself)."""
        f = self.f
        qb, kb = f.q[:, rows], f.k[:, cols]
        if f.kind == "exact":
            scores = torch.einsum("hrd,hcd->hrc", qb, kb) * f.scale - self.norm[:, rows, None]
            out = scores.exp()
        else:
            out = torch.einsum("hrm,hcm->hrc", qb, kb)
            if self._c is not None:  # k^_j exp(s_j - c_i) + floor
                ratio = f.key_scale[:, None, cols] - self._c[:, rows, None]
                out = out * ratio.clamp(max=0.0).exp() + qb.sum(-1, keepdim=True) * f.floor
        if f.causal:
            out = out.masked_fill(~_causal_mask(rows, cols), 0.0)
        return out

    def _num_t(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(h, k, q): ``_num(queries, keys)`` transposed, computed in that layout (no copy)."""
        f = self.f
        kb, qb = f.k[:, keys], f.q[:, queries]
        if f.kind == "exact":
            scores = torch.einsum("hkd,hqd->hkq", kb, qb) * f.scale - self.norm[:, None, queries]
            out = scores.exp()
        else:
            out = torch.einsum("hkm,hqm->hkq", kb, qb)
            if self._c is not None:
                ratio = f.key_scale[:, keys, None] - self._c[:, None, queries]
                out = out * ratio.clamp(max=0.0).exp() + qb.sum(-1)[:, None, :] * f.floor
        if f.causal:
            out = out.masked_fill(~_causal_mask(queries, keys).T, 0.0)
        return out

    def _normalised(self, block: torch.Tensor, queries: torch.Tensor, axis: int) -> torch.Tensor:
        """``block`` divided by D of its queries (along ``axis``: 1 rows, 2 columns); exact blocks are A already."""
        if self.f.kind == "exact":
            return block
        den = self.norm[:, queries]
        den = torch.where(den == 0, torch.ones_like(den), den)
        return block / (den[:, :, None] if axis == 1 else den[:, None, :])

    def _scan_rows(self, key_weight: torch.Tensor) -> torch.Tensor:
        """(h, T): ``sum_{j <= i} w_j num_ij`` for every query i (causal), in chunks of keys;
        ``key_weight`` (T,) (1 for all tokens: D; 1 on the residues: the residue row sums)."""
        f = self.f
        out = f.q.new_zeros(self.heads, self.tokens)
        carry = f.q.new_zeros(self.heads, f.q.shape[-1])  # sum_{j < a} w_j k^_j exp(s_j - c_ref)
        c_ref = None
        count = torch.cumsum(key_weight, 0)  # sum_{j <= i} w_j, for the floor term
        for a, b in tile_ranges(self.tokens, SCAN_CHUNK):
            idx = self._pos[a:b]
            intra = (self._num(idx, idx) * key_weight[a:b]).sum(-1)
            inter = torch.einsum("hrm,hm->hr", f.q[:, a:b], carry)
            if self._c is None:  # no per-key scales (relu): plain prefix sums
                carry = carry + torch.einsum("hcm,c->hm", f.k[:, a:b], key_weight[a:b])
            else:
                c = self._c[:, a:b]
                if c_ref is not None:  # exp(c_ref - c_i) <= 1: the running max only grows
                    inter = inter * (c_ref[:, None] - c).clamp(max=0.0).exp()
                    carry = carry * (c_ref - c[:, -1]).clamp(max=0.0).exp()[:, None]
                    inter = inter + f.floor * f.q[:, a:b].sum(-1) * count[a - 1]
                w = key_weight[a:b] * (f.key_scale[:, a:b] - c[:, -1:]).clamp(max=0.0).exp()
                carry = carry + torch.einsum("hcm,hc->hm", f.k[:, a:b], w)
                c_ref = c[:, -1]
            out[:, a:b] = inter + intra
        return out

    def _scan_cols(self, query_weight: torch.Tensor) -> torch.Tensor:
        """(h, T): ``sum_{i >= j} w_i num_ij`` for every key j (causal), chunks of queries in reverse;
        ``query_weight`` (h, T) (e.g. 1 / D_i on residue rows)."""
        f = self.f
        out = f.q.new_zeros(self.heads, self.tokens)
        carry = f.q.new_zeros(self.heads, f.q.shape[-1])  # sum_{i >= b} w_i q'_i exp(c_ref - c_i)
        floor_carry = f.q.new_zeros(self.heads)  # sum_{i >= b} w_i sum(q'_i)
        c_ref = None
        for a, b in reversed(list(tile_ranges(self.tokens, SCAN_CHUNK))):
            idx = self._pos[a:b]
            intra = (self._num(idx, idx) * query_weight[:, a:b, None]).sum(1)
            inter = torch.einsum("hcm,hm->hc", f.k[:, a:b], carry)
            wq = f.q[:, a:b] * query_weight[:, a:b, None]
            if self._c is not None:
                if c_ref is not None:
                    inter = inter * (f.key_scale[:, a:b] - c_ref[:, None]).clamp(max=0.0).exp()
                inter = inter + f.floor * floor_carry[:, None]
                floor_carry = floor_carry + wq.sum((1, 2))
                new_ref = self._c[:, a]
                if c_ref is not None:
                    carry = carry * (new_ref - c_ref).clamp(max=0.0).exp()[:, None]
                scale = (new_ref[:, None] - self._c[:, a:b]).clamp(max=0.0).exp()
                carry = carry + torch.einsum("hrm,hr->hm", wq, scale)
                c_ref = new_ref
            else:
                carry = carry + wq.sum(1)
            out[:, a:b] = inter + intra
        return out

    # ------------------------------------------------------------------ FAVOR+ sums
    def _favor_normaliser(self) -> torch.Tensor:
        """D (h, T) over all allowed tokens."""
        f = self.f
        if not f.causal:
            return torch.einsum("htm,hm->ht", f.q, f.k.sum(1))
        return self._scan_rows(f.q.new_ones(self.tokens))

    def _favor_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, c), each (h, L): row and column sums of the residue map A."""
        f, res = self.f, self.f.residues
        inv = 1.0 / torch.where(self.norm == 0, torch.ones_like(self.norm), self.norm)
        in_res = torch.zeros(self.tokens, dtype=f.q.dtype, device=f.q.device)
        in_res[res] = 1.0
        if not f.causal:
            rows = torch.einsum("hlm,hm->hl", f.q[:, res], f.k[:, res].sum(1)) * inv[:, res]
            cols = torch.einsum("hlm,hm->hl", f.k[:, res], (f.q[:, res] * inv[:, res, None]).sum(1))
            return rows, cols
        rows = self._scan_rows(in_res)[:, res] * inv[:, res]
        cols = self._scan_cols(inv * in_res)[:, res]
        return rows, cols

    # ------------------------------------------------------------------ exact sums (two passes)
    def _exact_lse(self) -> torch.Tensor:
        """Per-row logsumexp (h, T) of the scaled scores over all allowed tokens (pass 1)."""
        f = self.f
        out = f.q.new_empty(self.heads, self.tokens)
        for a, b in tile_ranges(self.tokens, self.tile):
            scores = torch.einsum("hrd,hcd->hrc", f.q[:, a:b], f.k) * f.scale
            if f.causal:
                scores = scores.masked_fill(~_causal_mask(self._pos[a:b], self._pos), float("-inf"))
            out[:, a:b] = torch.logsumexp(scores, -1)
        return out

    def _exact_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, c) of the residue map A, from row tiles of A (pass 2)."""
        rows = self.f.q.new_zeros(self.heads, self.length)
        cols = self.f.q.new_zeros(self.heads, self.length)
        for i0, i1 in tile_ranges(self.length, self.tile):
            block = self._num(self._res[i0:i1], self._res)  # (h, r, L) = A rows
            rows[:, i0:i1] = block.sum(-1)
            cols += block.sum(1)
        return rows, cols

    # ------------------------------------------------------------------ tiles
    def map_rows(self, i0: int, i1: int) -> torch.Tensor:
        """(h, i1 - i0, L): rows i0..i1 of the residue maps A, normalised by the rows' own sums
        over all allowed tokens (as ``attention_matrix`` computes them)."""
        block = self._num(self._res[i0:i1], self._pos)  # (h, r, T)
        if self.f.kind == "exact":  # softmax over the allowed tokens, as the model does it
            return block[:, :, self.f.residues]
        den = block.sum(-1, keepdim=True)
        return (block / torch.where(den == 0, torch.ones_like(den), den))[:, :, self.f.residues]

    def map_cols(self, j0: int, j1: int) -> torch.Tensor:
        """(h, L, j1 - j0): columns j0..j1 of the residue maps A (normalised by D)."""
        block = self._num(self._res, self._res[j0:j1])
        if self.f.kind == "exact":
            return block
        den = self.norm[:, self.f.residues, None]
        return block / torch.where(den == 0, torch.ones_like(den), den)

    def sym_rows(self, i0: int, i1: int) -> torch.Tensor:
        """(h, r, L): rows of S = A + A^T."""
        return self.map_rows(i0, i1) + self.map_cols(i0, i1).transpose(1, 2)

    def apc_rows(self, i0: int, i1: int) -> torch.Tensor:
        """(h, r, L): rows of APC(S) = S_ij - rs_i rs_j / total."""
        rs = self.sym_sums
        return self.sym_rows(i0, i1) - rs[:, i0:i1, None] * rs[:, None, :] / self.total[:, :, None]

    def apc_mean_rows(self, i0: int, i1: int) -> torch.Tensor:
        """(r, L): the mean over the heads of the APC tiles."""
        return self.apc_rows(i0, i1).mean(0)

    def sym_upper(self, i0: int, i1: int) -> torch.Tensor:
        """(h, r, L - i0): rows i0..i1 of S = A + A^T from column i0 on (the upper part that every
        pair i <= j lies in): half the work of :meth:`sym_rows`, a quarter when causal (A^T is 0
        left of the diagonal there, A right of it)."""
        res = self._res
        out = self._normalised(self._num_t(res[i0:i1], res[i0:]), res[i0:], axis=2)  # A[i0:, i0:i1]^T
        if self.f.causal:
            diag = self._normalised(self._num(res[i0:i1], res[i0:i1]), res[i0:i1], axis=1)
            out[:, :, : i1 - i0] += diag
            return out
        return out + self._normalised(self._num(res[i0:i1], res[i0:]), res[i0:i1], axis=1)

    def apc_upper(self, i0: int, i1: int) -> torch.Tensor:
        """(h, r, L - i0): rows i0..i1 of APC(S) from column i0 on."""
        rs = self.sym_sums
        return self.sym_upper(i0, i1) - rs[:, i0:i1, None] * rs[:, None, i0:] / self.total[:, :, None]


class TopPairs:
    """The ``k`` largest values of an L x L map over pairs i < j with j - i >= ``min_sep``, fed as
    row tiles (:meth:`add`); memory O(k + tile). ``batch``: that many maps at once (tiles (batch,
    r, L), e.g. every head of a layer), None: one map (tiles (r, L))."""

    def __init__(self, k: int, min_sep: int = 1, batch: int | None = None):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k, self.min_sep, self.batch = int(k), max(1, int(min_sep)), batch
        n = 1 if batch is None else int(batch)
        self.values = torch.empty(n, 0, dtype=torch.float64)
        self.rows = torch.empty(n, 0, dtype=torch.long)
        self.cols = torch.empty(n, 0, dtype=torch.long)

    def add(self, i0: int, tile: torch.Tensor, col0: int = 0) -> None:
        """Merge the rows i0.. of the map(s) into the running top k; the tile's columns start at
        ``col0`` (e.g. ``i0`` for :meth:`LayerTiles.apc_upper` tiles)."""
        t = tile[None] if self.batch is None else tile
        _, r, length = t.shape
        i = torch.arange(i0, i0 + r, device=t.device)[:, None]
        ok = (torch.arange(col0, col0 + length, device=t.device)[None, :] - i) >= self.min_sep
        n = min(self.k, int(ok.sum()))
        if n == 0:
            return
        top = torch.topk(t.masked_fill(~ok, float("-inf")).reshape(len(t), -1), n, dim=-1)
        idx = top.indices.cpu()
        self.values = torch.cat([self.values, top.values.cpu().to(torch.float64)], 1)
        self.rows = torch.cat([self.rows, idx // length + i0], 1)
        self.cols = torch.cat([self.cols, idx % length + col0], 1)
        if self.values.shape[1] > self.k:
            keep = torch.topk(self.values, self.k, dim=-1).indices
            self.values, self.rows, self.cols = (x.gather(1, keep) for x in (self.values, self.rows, self.cols))

    def result(self):
        """``(i, j, value)`` sorted by value (largest first), ties by (i, j); a list of them, one
        per map, with ``batch``."""
        out = []
        for v, i, j in zip(self.values.numpy(), self.rows.numpy(), self.cols.numpy()):
            order = np.lexsort((j, i, -v))
            out.append((i[order].astype(np.int64), j[order].astype(np.int64), v[order]))
        return out[0] if self.batch is None else out


class ContactLogits:
    """``logit_ij = bias + sum_{layer, head} w_{layer, head} APC(S_{layer, head})_ij``, the contact
    head's linear part, summed one (layer, tile) at a time; ``round_to`` rounds every APC tile
    first (float16: the head's features as maps.h5 stores them)."""

    def __init__(self, weights: np.ndarray, bias: float, round_to: torch.dtype | None = torch.float16):
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))  # (layers, heads)
        if self.weights.dim() != 2:
            raise ValueError(f"weights must be (layers, heads), got {tuple(self.weights.shape)}")
        self.bias, self.round_to = float(bias), round_to

    def tile(self, layer_tiles: list[LayerTiles], i0: int, i1: int) -> torch.Tensor:
        """(r, L) float64 logits of rows i0..i1 from every layer's :class:`LayerTiles`, in order."""
        if len(layer_tiles) != self.weights.shape[0]:
            raise ValueError(f"{len(layer_tiles)} layers given, the weights have {self.weights.shape[0]}")
        out = None
        for layer, lt in enumerate(layer_tiles):
            part = self.layer_part(layer, lt, i0, i1)
            out = part if out is None else out + part
        return out + self.bias

    def layer_part(self, layer: int, lt: LayerTiles, i0: int, i1: int, upper: bool = False) -> torch.Tensor:
        """(r, L) float64: layer ``layer``'s term of the logits of rows i0..i1 (no bias), from
        column i0 on (r, L - i0) with ``upper``."""
        apc = lt.apc_upper(i0, i1) if upper else lt.apc_rows(i0, i1)
        if self.round_to is not None:
            apc = apc.to(self.round_to)
        return torch.einsum("h,hrl->rl", self.weights[layer], apc.to(torch.float32).to(torch.float64))
