"""maps.h5, the layout: constants, errors, the record type and the per-record checksums.

Layout (``FORMAT_VERSION`` 1)::

    /                               file attrs
        format_version   int        1
        model_config     str        JSON of the model's config
        checkpoint_sha256 str       hash of the checkpoint the maps came from ("" if none)
        causal           bool       True for a unidirectional (causal) model
    /<group>                        one per sequence; name = sanitize_name(id) (unique)
        attrs id         str        the record id, unchanged
        attrs sequence   str        the residues (one letter), length L
        attrs source     str        "<structure file name>:<chain>" or the FASTA file ("" if none)
        tokens           uint8 (L,)                       tokenizer ids, special tokens dropped
        attentions       float16 (layers, heads, L, L)    row i = attention of residue i; special
                                                          tokens dropped (rows need not sum to 1)
        apc              float16 (layers, heads, L, L)    optional: apc(symmetrize(attentions))
        apc_mean         float16 (n, L, L)                optional: mean over the heads of the APC
                                                          maps, per layer (attr reduce "layer", n =
                                                          layers) or over all layers too ("all", n = 1)
        contacts/pairs   int32 (layers, heads, k, 2)      optional: the top k (i, j) pairs (i < j,
                                                          j - i >= attr min_sep) of every APC map
        contacts/values  float32 (layers, heads, k)       their APC values, largest first
        embeddings/mean       float32 (dim,)              optional: mean over residues, last layer
        embeddings/per_token  float32 (L, dim)            optional: last layer, per residue

Groups keep the order they were written in. Datasets are gzip-compressed, one chunk per (layer,
all heads), for long sequences per (layer, all heads, band of rows); ``apc_mean`` one per (layer,
band of rows). Export's map selection (``layers=``, ``heads=``,
:mod:`protein_performer.analysis.export.tiles`): ``attentions`` / ``apc`` then hold the selected
layers x heads, in order, named by the group attributes ``map_layers`` / ``map_heads`` (absent:
all); the tiled datasets (``EXTRA_DATASETS``, written in row tiles from the layers' features, in
this order: ``apc_mean`` of each layer before its dense maps when reduced per layer, after the last
layer otherwise, then ``contacts``) carry ``layers`` and ``heads`` attributes.
:class:`~protein_performer.analysis.maps.reader.MapsFile` reads one group at a time (lazily);
:func:`~protein_performer.analysis.maps.reader.read_maps` iterates over the records.

Two root attributes were added to layout version 1 (readers of older files ignore nothing):

* ``vocab`` (JSON list of the tokenizer's tokens, id order): which ids ``tokens`` hold. A file
  with another vocabulary is refused (:class:`MapsFormatError`); a file without the attribute
  (written before it existed, or by another program) has each record's ``tokens`` checked
  against its ``sequence`` instead.
* ``incomplete`` (str), the completion marker: ``MapsWriter`` writes it first, before any
  record, and deletes it only when the file is closed after a successful write. A file that
  still carries it was never finished (the writer was killed or failed) and every reader refuses
  it with :class:`~protein_performer.errors.IncompleteOutputError`. Files written before the
  marker existed never carry it, so they stay readable as complete: they were only ever seen
  under their final name after a complete write (export renames a finished ``.partial``).

Record checksum (export's resume): CRC-32s of the attributes + tokens, the attention maps (layer
by layer, each layer band by band of its chunks' rows: the whole layer when it is one chunk), the
APC maps, the mean and the per-token embeddings, as ``crc32:<5 x 8 hex>``, then one
more ``:<8 hex>`` per tiled dataset the record holds (in ``EXTRA_DATASETS`` order).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import UserError

FORMAT_VERSION = 1
INCOMPLETE_ATTR = "incomplete"
INCOMPLETE_VALUE = "writing started and not finished"
VOCAB_ATTR = "vocab"
LAYOUT_ATTRS = ("format_version", "model_config", "checkpoint_sha256", "causal", INCOMPLETE_ATTR, VOCAB_ATTR)
RECORD_ATTRS = ("id", "sequence", "source")  # a record group's own attributes (others are extras)
MAP_DATASETS = ("attentions", "apc")
CHECKSUM_PARTS = ("record", "attentions", "apc", "mean", "per_token")
EXTRA_DATASETS = ("apc_mean", "contacts/pairs", "contacts/values")  # written in row tiles (export.tiles)

_NAME_RE = re.compile(r"[^A-Za-z0-9_.\-]")


class MapsFormatError(UserError, ValueError):
    """A maps file that is not one (not HDF5, another layout version or vocabulary, corrupted)."""


def incomplete_message(path: str | Path) -> str:
    return (
        f"{path}: incomplete: the export was interrupted (the file was never finished); "
        "rerun the export with resume=true (or overwrite=true to start it again)"
    )


def vocab_json() -> str:
    """The ``vocab`` attribute: the tokenizer's tokens in id order, as JSON."""
    return json.dumps(Tokenizer().tokens)


def sanitize_name(record_id: str) -> str:
    """An HDF5 group name for a record id: characters other than ``A-Za-z0-9_.-`` become ``_``."""
    name = _NAME_RE.sub("_", record_id) or "_"
    return "_" + name if name.startswith(".") else name


@dataclass
class MapsRecord:
    """One sequence of a maps file. Arrays that were not stored (or not asked for) are None."""

    id: str
    sequence: str
    tokens: np.ndarray
    source: str = ""
    attentions: np.ndarray | None = None  # (layers, heads, L, L) float16
    apc: np.ndarray | None = None  # (layers, heads, L, L) float16
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    group: str = ""
    apc_mean: np.ndarray | None = None  # (n, L, L) float16
    contacts: dict[str, np.ndarray] = field(default_factory=dict)  # pairs (layers, heads, k, 2), values

    def __len__(self) -> int:
        return len(self.sequence)


# ------------------------------------------------------------------------------ checksums
def new_checksum(grp: h5py.Group) -> dict[str, int]:
    """The running CRC-32s of a record whose attributes and tokens are written, maps not yet."""
    return {"record": record_head_crc(grp), "attentions": 0, "apc": 0, "mean": 0, "per_token": 0}


def record_head_crc(grp: h5py.Group) -> int:
    """CRC-32 of a record's attributes (the extra ones in name order) and tokens."""
    head = json.dumps(
        [[k, _plain_attr(grp.attrs[k])] for k in RECORD_ATTRS if k in grp.attrs]
        + [[k, _plain_attr(grp.attrs[k])] for k in sorted(grp.attrs) if k not in RECORD_ATTRS]
    )
    return zlib.crc32(np.ascontiguousarray(grp["tokens"][()], dtype=np.uint8).tobytes(), zlib.crc32(head.encode()))


def checksum_str(crc: dict[str, int]) -> str:
    return "crc32:" + ":".join(f"{crc[k]:08x}" for k in CHECKSUM_PARTS + EXTRA_DATASETS if k in crc)


def row_band(ds: h5py.Dataset) -> int:
    """Rows per chunk of a dense map dataset (layers, heads, L, L): L for one chunk per layer, fewer
    for a long sequence's maps written in row tiles."""
    return max(1, ds.chunks[2] if ds.chunks else ds.shape[2])


def extra_spec(ds: h5py.Dataset) -> dict:
    """How a tiled dataset was created (``MapsWriter.begin_layers``' ``extras`` entry)."""
    attrs = {k: ds.attrs[k] for k in ds.attrs}
    return dict(shape=ds.shape, dtype=ds.dtype, chunks=ds.chunks, compress=ds.compression is not None, attrs=attrs)


def _dataset_crc(ds: h5py.Dataset) -> int:
    """CRC-32 of a dataset's bytes in C order, read by chunks of rows (never the whole of a big one)."""
    crc = 0
    if ds.ndim < 3:
        return zlib.crc32(np.ascontiguousarray(ds[()]).tobytes())
    rows = ds.chunks[1] if ds.chunks else ds.shape[1]
    for n in range(ds.shape[0]):
        for i0 in range(0, ds.shape[1], rows):
            crc = zlib.crc32(np.ascontiguousarray(ds[n, i0 : i0 + rows]).tobytes(), crc)
    return crc


def record_checksum(grp: h5py.Group) -> str:
    """CRC-32s of everything a record stores: attributes + tokens, the attention maps (layer by
    layer), the APC maps, the mean and per-token embeddings. Equal to the ``LayerRecord.checksum``
    its writer computed, so export's resume can tell an intact record from a damaged one."""
    crc = new_checksum(grp)
    for what in MAP_DATASETS:
        if what in grp:
            ds, band = grp[what], row_band(grp[what])
            for n in range(ds.shape[0]):
                for i0 in range(0, ds.shape[2], band):
                    block = np.ascontiguousarray(ds[n, :, i0 : i0 + band], dtype=np.float16)
                    crc[what] = zlib.crc32(block.tobytes(), crc[what])
    if "embeddings" in grp:
        for what in ("mean", "per_token"):
            if what in grp["embeddings"]:
                arr = np.ascontiguousarray(grp["embeddings"][what][()], dtype=np.float32)
                crc[what] = zlib.crc32(arr.tobytes())
    for what in EXTRA_DATASETS:
        if what in grp:
            crc[what] = _dataset_crc(grp[what])
    return checksum_str(crc)


def _plain_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    return v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v


# ------------------------------------------------------------------------------ small helpers
def attr_str(v: Any) -> str:
    """An HDF5 string attribute as ``str`` (h5py may hand back bytes)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def json_or_empty(v: Any) -> dict:
    """The JSON object of an attribute such as ``export`` (what produced the file), or {}."""
    try:
        d = json.loads(attr_str(v)) if v is not None else {}
    except (TypeError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}
