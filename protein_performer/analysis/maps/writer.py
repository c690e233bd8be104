"""maps.h5, the writer: :class:`MapsWriter` (record by record, or one layer at a time through a
:class:`LayerRecord`) and :func:`write_maps` for a list of records. The layout is
:mod:`protein_performer.analysis.maps.format`'s; the APC maps are :func:`~protein_performer.analysis.maps.ops.apc_maps`.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from protein_performer.analysis.maps.format import (
    EXTRA_DATASETS,
    FORMAT_VERSION,
    INCOMPLETE_ATTR,
    INCOMPLETE_VALUE,
    LAYOUT_ATTRS,
    RECORD_ATTRS,
    VOCAB_ATTR,
    MapsRecord,
    attr_str,
    checksum_str,
    extra_spec,
    new_checksum,
    row_band,
    sanitize_name,
    vocab_json,
)
from protein_performer.analysis.maps.ops import apc_maps
from protein_performer.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["LayerRecord", "MapsWriter", "write_maps"]


class MapsWriter:
    """Write a maps file record by record (a context manager)::

        with MapsWriter(path, model_config=cfg, checkpoint_sha256=h, causal=False) as w:
            w.add("P12345", "MKT...", attentions, source="1abc.pdb:A", apc=True)

    Layer by layer (one layer's maps in memory): ``add_layers`` takes an iterable of layers;
    ``begin_layers`` returns a :class:`LayerRecord` to hand each layer to as it is computed.
    """

    def __init__(
        self,
        path: str | Path,
        model_config: dict | str | None = None,
        checkpoint_sha256: str = "",
        causal: bool = False,
        compression: str | None = "gzip",
        compression_opts: int | None = 1,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._h5 = h5py.File(self.path, "w", track_order=True)  # groups keep write order
        cfg = model_config if isinstance(model_config, str) else json.dumps(model_config or {}, default=str)
        self._h5.attrs[INCOMPLETE_ATTR] = INCOMPLETE_VALUE  # first: removed by close() after a complete write
        self._h5.attrs["format_version"] = FORMAT_VERSION
        self._h5.attrs["model_config"] = cfg
        self._h5.attrs["checkpoint_sha256"] = checkpoint_sha256 or ""
        self._h5.attrs["causal"] = bool(causal)
        self._h5.attrs[VOCAB_ATTR] = vocab_json()
        self._comp = dict(compression=compression, compression_opts=compression_opts) if compression else {}
        self._tokenizer = Tokenizer(unknown="X")
        self.n_records = 0

    def _maps(self, grp: h5py.Group, name: str, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        chunks = (1,) + arr.shape[1:] if arr.size else None
        comp = self._comp if arr.size else {}
        grp.create_dataset(name, data=arr.astype(np.float16), chunks=chunks, **comp)

    def add(
        self,
        record_id: str,
        sequence: str,
        attentions: np.ndarray | None = None,
        *,
        tokens: np.ndarray | None = None,
        source: str = "",
        apc: np.ndarray | bool | None = None,
        mean: np.ndarray | None = None,
        per_token: np.ndarray | None = None,
    ) -> str:
        """Add one record; returns its group name. ``attentions``: (layers, heads, L, L).
        ``apc=True`` computes the APC maps from ``attentions`` (before the float16 cast); an array
        is stored as given."""
        L = len(sequence)
        for what, arr in (("attentions", attentions), ("apc", apc)):
            if isinstance(arr, np.ndarray) and (arr.ndim != 4 or arr.shape[2:] != (L, L)):
                raise ValueError(
                    f"{record_id}: {what} shape {arr.shape}, expected (layers, heads, {L}, {L}) "
                    "with the special tokens dropped"
                )
        if apc is True and attentions is None:
            raise ValueError(f"{record_id}: apc=True needs the attentions")
        grp = self._new_group(record_id, sequence, tokens, source, mean, per_token)
        if attentions is not None:
            self._maps(grp, "attentions", attentions)
        if apc is True:
            apc = apc_maps(attentions)
        if isinstance(apc, np.ndarray):
            self._maps(grp, "apc", apc)
        return grp.name.lstrip("/")

    def add_layers(
        self,
        record_id: str,
        sequence: str,
        layers: Iterable[np.ndarray],
        n_layers: int,
        n_heads: int,
        *,
        tokens: np.ndarray | None = None,
        source: str = "",
        apc: bool = True,
        mean: np.ndarray | None = None,
        per_token: np.ndarray | None = None,
    ) -> str:
        """Add one record layer by layer (memory: one layer's maps): ``layers`` yields
        ``n_layers`` arrays (heads, L, L); with ``apc`` the APC maps are computed per layer.
        On any error (also one raised by ``layers``) the record is dropped."""
        with self.begin_layers(
            record_id,
            sequence,
            n_layers,
            n_heads,
            tokens=tokens,
            source=source,
            apc=apc,
            mean=mean,
            per_token=per_token,
        ) as record:
            for layer in layers:
                record.write_layer(layer)
        return record.name

    def begin_layers(
        self,
        record_id: str,
        sequence: str,
        n_layers: int,
        n_heads: int,
        *,
        tokens: np.ndarray | None = None,
        source: str = "",
        attentions: bool = True,
        apc: bool = True,
        mean: np.ndarray | None = None,
        per_token: np.ndarray | None = None,
        attrs: dict[str, Any] | None = None,
        extras: dict[str, dict] | None = None,
        rows: int | None = None,
    ) -> LayerRecord:
        """Start a record whose maps are handed over one layer at a time, in order, with
        :meth:`LayerRecord.write_layer` (for a producer that calls back per layer; an iterable of
        layers goes to :meth:`add_layers`). ``attentions`` / ``apc`` pick the datasets stored (neither:
        a record of tokens and embeddings only); ``attrs`` are extra attributes of the record's group;
        ``extras`` the tiled datasets (:data:`~protein_performer.analysis.maps.format.EXTRA_DATASETS`: name -> shape, dtype,
        chunks, compress), filled with :meth:`LayerRecord.write_extra`; ``rows``: the dense maps
        chunked by that many rows, written band by band with :meth:`LayerRecord.write_rows`.
        Use the record as a context manager: leaving it checks that all ``n_layers`` were written,
        and on any error the record is dropped (no half-written record stays behind)."""
        grp = self._new_group(record_id, sequence, tokens, source, mean, per_token)
        try:
            for key, value in (attrs or {}).items():
                grp.attrs[key] = value
            L = len(sequence)
            band = L if rows is None else max(1, min(int(rows), L))
            kw = dict(shape=(n_layers, n_heads, L, L), dtype=np.float16, chunks=(1, n_heads, band, L), **self._comp)
            datasets = {
                what: grp.create_dataset(what, **kw) for what, on in (("attentions", attentions), ("apc", apc)) if on
            }
            for name, spec in (extras or {}).items():
                comp = self._comp if spec.get("compress") else {}
                ds = grp.create_dataset(
                    name, shape=spec["shape"], dtype=spec["dtype"], chunks=spec.get("chunks"), **comp
                )
                for key in sorted(spec.get("attrs", {})):
                    ds.attrs[key] = spec["attrs"][key]
        except BaseException:
            self.discard(grp.name)
            raise
        return LayerRecord(self, grp, record_id, L, n_layers, n_heads, datasets, band)

    def discard(self, name: str) -> None:
        """Drop the record ``name`` (a group name :meth:`add` / :meth:`begin_layers` returned)."""
        del self._h5[name]
        self.n_records -= 1

    def set_attr(self, key: str, value: Any) -> None:
        """Set an extra file attribute (e.g. a writer's own provenance); the layout's own
        attributes (``format_version``, ``model_config``, ...) are the constructor's."""
        if key in LAYOUT_ATTRS:
            raise ValueError(f"{key!r} is an attribute of the maps layout, set by MapsWriter itself")
        self._h5.attrs[key] = value

    def _per_token(self, record_id: str, L: int, per_token: np.ndarray | None) -> np.ndarray | None:
        if per_token is not None:
            per_token = np.asarray(per_token, dtype=np.float32)
            if per_token.ndim != 2 or per_token.shape[0] != L:
                raise ValueError(f"{record_id}: per_token shape {per_token.shape}, expected ({L}, dim)")
        return per_token

    def _write_embeddings(self, grp: h5py.Group, mean: np.ndarray | None, per_token: np.ndarray | None) -> None:
        if mean is not None or per_token is not None:
            emb = grp.require_group("embeddings")
            if mean is not None:
                emb.create_dataset("mean", data=np.asarray(mean, dtype=np.float32))
            if per_token is not None:
                emb.create_dataset("per_token", data=per_token, **self._comp)

    def _new_group(
        self,
        record_id: str,
        sequence: str,
        tokens: np.ndarray | None,
        source: str,
        mean: np.ndarray | None,
        per_token: np.ndarray | None,
    ) -> h5py.Group:
        L = len(sequence)
        if tokens is None:
            tokens = self._tokenizer.encode(sequence)
        tokens = np.asarray(tokens, dtype=np.uint8)
        if tokens.shape != (L,):
            raise ValueError(f"{record_id}: tokens shape {tokens.shape} != ({L},) of the sequence")
        per_token = self._per_token(record_id, L, per_token)
        grp = self._h5.create_group(self._unique_name(record_id))
        grp.attrs["id"] = record_id
        grp.attrs["sequence"] = sequence
        grp.attrs["source"] = source or ""
        grp.create_dataset("tokens", data=tokens)
        self._write_embeddings(grp, mean, per_token)
        self.n_records += 1
        return grp

    def _unique_name(self, record_id: str) -> str:
        """``sanitize_name(record_id)``, with ``__2``, ``__3``, ... appended while it is taken."""
        name = sanitize_name(record_id)
        if name in self._h5:
            base, n = name, 2
            while f"{base}__{n}" in self._h5:
                n += 1
            name = f"{base}__{n}"
        return name

    def copy_record(self, src: h5py.Group) -> LayerRecord:
        """Write a copy of the record ``src`` (a group of another maps file) with the same calls, in
        the same order, as export wrote it (:meth:`begin_layers` with the group's extra attributes
        in name order, each layer's stored maps, then the embeddings), so that a file rebuilt from
        copies is byte-identical to the original. Returns the finished record."""
        extra = {k: src.attrs[k] for k in sorted(src.attrs) if k not in RECORD_ATTRS}
        stored = [w for w in ("attentions", "apc") if w in src]
        n_layers, n_heads = src[stored[0]].shape[:2] if stored else (0, 0)
        extras = {name: extra_spec(src[name]) for name in EXTRA_DATASETS if name in src}
        if not stored and "contacts/pairs" in src:
            n_layers, n_heads = src["contacts/pairs"].shape[:2]
        per_layer = "apc_mean" in src and attr_str(src["apc_mean"].attrs.get("reduce", "layer")) == "layer"
        if not stored and per_layer:
            n_layers = src["apc_mean"].shape[0]
        band = row_band(src[stored[0]]) if stored else None
        L = len(src["tokens"])
        with self.begin_layers(
            attr_str(src.attrs["id"]),
            attr_str(src.attrs["sequence"]),
            n_layers,
            n_heads,
            tokens=src["tokens"][()],
            source=attr_str(src.attrs.get("source", "")),
            attentions="attentions" in src,
            apc="apc" in src,
            attrs=extra,
            extras=extras,
            rows=band if band is not None and band < L else None,
        ) as record:
            for n in range(n_layers):  # the order export writes in (maps.format: tiled datasets)
                if record.band < L:  # band by band: the head-mean rows, then the maps' rows
                    for i0 in range(0, L, record.band):
                        if per_layer:
                            record.copy_extra(src["apc_mean"], n, slice(i0, i0 + record.band))
                        record.write_rows(
                            i0,
                            *(src[w][n, :, i0 : i0 + record.band] if w in src else None for w in ("attentions", "apc")),
                        )
                    continue
                if per_layer:
                    record.copy_extra(src["apc_mean"], n)
                record.write_stored_layer(*(src[w][n] if w in src else None for w in ("attentions", "apc")))
            if "apc_mean" in src and not per_layer:
                record.copy_extra(src["apc_mean"], 0)
            for name in ("contacts/pairs", "contacts/values"):
                if name in src:
                    record.write_extra(name, (), src[name][()])
            if "embeddings" in src:
                emb = src["embeddings"]
                record.add_embeddings(
                    mean=emb["mean"][()] if "mean" in emb else None,
                    per_token=emb["per_token"][()] if "per_token" in emb else None,
                )
        return record

    def flush(self) -> None:
        """Write what HDF5 holds in memory to the file (export calls it after every record)."""
        self._h5.flush()

    def close(self) -> None:
        """Finish the file: remove the ``incomplete`` marker, then close."""
        if self._h5.id.valid:
            if INCOMPLETE_ATTR in self._h5.attrs:
                del self._h5.attrs[INCOMPLETE_ATTR]
            self._h5.close()

    def abort(self) -> None:
        """Close without finishing: the file keeps its ``incomplete`` marker (readers refuse it).
        Errors on the way out (a full disk) are logged, not raised over the original one."""
        if self._h5.id.valid:
            try:
                self._h5.close()
            except Exception as e:  # the error that made us abort is the one to report
                log.debug("%s: closing an aborted maps file failed: %s", self.path, e)

    def __enter__(self) -> MapsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class LayerRecord:
    """A record of a :class:`MapsWriter` being written one layer at a time (from
    :meth:`MapsWriter.begin_layers`); a context manager that drops the record on any error."""

    def __init__(
        self,
        writer: MapsWriter,
        grp: h5py.Group,
        record_id: str,
        length: int,
        n_layers: int,
        n_heads: int,
        datasets: dict[str, h5py.Dataset],
        band: int | None = None,
    ):
        self.name = grp.name.lstrip("/")  # the group name, as MapsWriter.add returns it
        self.record_id = record_id
        self.length, self.n_layers, self.n_heads = length, n_layers, n_heads
        self.layers_written = 0
        self._writer, self._grp, self._datasets = writer, grp, datasets
        self._crc = new_checksum(grp)
        self.band = length if band is None else band  # rows per chunk of the dense maps
        self._next_row = 0

    @property
    def checksum(self) -> str:
        """CRC-32s of what the record stored (see :func:`record_checksum`), as written."""
        return checksum_str(self._crc)

    def write_layer(self, maps: np.ndarray) -> None:
        """Store the next layer's maps (heads, L, L), special tokens dropped: as float16, and their
        APC maps (computed from ``maps`` before the cast) where the record keeps them."""
        maps = np.asarray(maps)
        n, L = self.layers_written, self.length
        if n >= self.n_layers or maps.shape != (self.n_heads, L, L):
            raise ValueError(
                f"{self.record_id}: layer {n} shape {maps.shape}, expected {self.n_layers} "
                f"layers of ({self.n_heads}, {L}, {L})"
            )
        self.write_stored_layer(
            maps.astype(np.float16) if "attentions" in self._datasets else None,
            apc_maps(maps).astype(np.float16) if "apc" in self._datasets else None,
        )

    def write_stored_layer(self, attentions: np.ndarray | None, apc: np.ndarray | None) -> None:
        """Store the next layer as given (float16 arrays (heads, L, L), e.g. copied from another
        file); a dataset the record keeps needs its array."""
        n, L = self.layers_written, self.length
        for what, arr in (("attentions", attentions), ("apc", apc)):
            if what not in self._datasets:
                continue
            arr = np.ascontiguousarray(arr, dtype=np.float16)
            if n >= self.n_layers or arr.shape != (self.n_heads, L, L):
                raise ValueError(
                    f"{self.record_id}: layer {n} {what} shape {arr.shape}, expected {self.n_layers} "
                    f"layers of ({self.n_heads}, {L}, {L})"
                )
            self._datasets[what][n] = arr
            for i0 in range(0, L, self.band):  # the CRC runs band by band (maps.format: record checksum)
                self._crc[what] = zlib.crc32(arr[:, i0 : i0 + self.band].tobytes(), self._crc[what])
        self.layers_written = n + 1

    def write_rows(self, i0: int, attentions: np.ndarray | None, apc: np.ndarray | None) -> None:
        """Store the next band of rows i0.. of the current layer (float16 (heads, rows, L), one
        chunk's rows: ``begin_layers(rows=)``); the layer is complete with its last band."""
        n, L = self.layers_written, self.length
        rows = min(self.band, L - i0)
        if i0 != self._next_row or n >= self.n_layers:
            raise ValueError(f"{self.record_id}: layer {n} rows {i0}.. out of order (next: {self._next_row})")
        for what, arr in (("attentions", attentions), ("apc", apc)):
            if what in self._datasets:
                arr = np.ascontiguousarray(arr, dtype=np.float16)
                if arr.shape != (self.n_heads, rows, L):
                    raise ValueError(f"{self.record_id}: {what} rows shape {arr.shape} != {(self.n_heads, rows, L)}")
                self._datasets[what][n, :, i0 : i0 + rows] = arr
                self._crc[what] = zlib.crc32(arr.tobytes(), self._crc[what])
        self._next_row = i0 + rows
        if self._next_row == L:
            self._next_row, self.layers_written = 0, n + 1

    def write_extra(self, name: str, where: tuple, arr: np.ndarray) -> None:
        """Store ``arr`` at ``where`` of the tiled dataset ``name`` (from ``begin_layers(extras=)``);
        written in C order (layer by layer, rows in order), so the CRC-32 streams with the data."""
        ds = self._grp[name]
        arr = np.ascontiguousarray(arr, dtype=ds.dtype)
        ds[where] = arr
        self._crc[name] = zlib.crc32(arr.tobytes(), self._crc.get(name, 0))

    def copy_extra(self, src: h5py.Dataset, n: int, where: slice = slice(None)) -> None:
        """Copy ``src[n, where]`` (an ``apc_mean`` of another file) into this record's, by chunks of rows."""
        rows = src.chunks[1] if src.chunks else src.shape[1]
        start, stop, _ = where.indices(src.shape[1])
        for i0 in range(start, stop, rows):
            i1 = min(i0 + rows, stop)
            self.write_extra(src.name.rsplit("/", 1)[-1], (n, slice(i0, i1)), src[n, i0:i1])

    def add_embeddings(self, mean: np.ndarray | None = None, per_token: np.ndarray | None = None) -> None:
        """The record's embeddings, where they are known only after its maps (same checks and
        storage as :meth:`MapsWriter.add`'s ``mean`` / ``per_token``)."""
        per_token = self._writer._per_token(self.record_id, self.length, per_token)
        self._writer._write_embeddings(self._grp, mean, per_token)
        for what, arr in (("mean", mean), ("per_token", per_token)):
            if arr is not None:
                self._crc[what] = zlib.crc32(np.ascontiguousarray(arr, dtype=np.float32).tobytes())

    def __enter__(self) -> LayerRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._datasets and self.layers_written != self.n_layers:
            self._writer.discard(self.name)
            raise ValueError(f"{self.record_id}: got {self.layers_written} layers, expected {self.n_layers}")
        if exc_type is not None:
            self._writer.discard(self.name)  # no half-written record stays behind


def write_maps(
    path: str | Path,
    records: Iterable[MapsRecord | dict],
    model_config: dict | None = None,
    checkpoint_sha256: str = "",
    causal: bool = False,
    apc: bool = False,
) -> int:
    """Write records (:class:`MapsRecord` or dicts with its field names) to ``path``; returns the
    count. ``apc=True`` computes the APC maps of records that carry none."""
    with MapsWriter(path, model_config, checkpoint_sha256, causal) as w:
        for r in records:
            d = r if isinstance(r, dict) else r.__dict__
            emb = d.get("embeddings") or {}
            rec_apc = d.get("apc")
            w.add(
                d["id"],
                d["sequence"],
                d.get("attentions"),
                tokens=d.get("tokens"),
                source=d.get("source", ""),
                apc=rec_apc if rec_apc is not None else (apc or None),
                mean=emb.get("mean", d.get("mean")),
                per_token=emb.get("per_token", d.get("per_token")),
            )
        return w.n_records
