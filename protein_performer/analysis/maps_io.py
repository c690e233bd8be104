"""maps.h5: the attention maps (and embeddings) of a model for a set of sequences.

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
        embeddings/mean       float32 (dim,)              optional: mean over residues, last layer
        embeddings/per_token  float32 (L, dim)            optional: last layer, per residue

Groups keep the order they were written in. Datasets are gzip-compressed, one chunk per (layer,
all heads). :class:`MapsFile` reads one group at a time (lazily); :func:`read_maps` iterates over
the records of a file.

Two root attributes were added to layout version 1 (readers of older files ignore nothing):

* ``vocab`` (JSON list of the tokenizer's tokens, id order): which ids ``tokens`` hold. A file
  with another vocabulary is refused (:class:`MapsFormatError`); a file without the attribute
  (written before it existed, or by another program) has each record's ``tokens`` checked
  against its ``sequence`` instead.
* ``incomplete`` (str), the completion marker: :class:`MapsWriter` writes it first, before any
  record, and deletes it only when the file is closed after a successful write. A file that
  still carries it was never finished (the writer was killed or failed) and every reader refuses
  it with :class:`~protein_performer.errors.IncompleteOutputError`. Files written before the
  marker existed never carry it, so they stay readable as complete: they were only ever seen
  under their final name after a complete write (export renames a finished ``.partial``).
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import IncompleteOutputError, UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INCOMPLETE_ATTR = "incomplete"
INCOMPLETE_VALUE = "writing started and not finished"
VOCAB_ATTR = "vocab"
LAYOUT_ATTRS = ("format_version", "model_config", "checkpoint_sha256", "causal", INCOMPLETE_ATTR, VOCAB_ATTR)
PARTIAL_SUFFIX = ".partial"  # export writes <output>.partial and renames it when complete


class MapsFormatError(UserError, ValueError):
    """A maps file that is not one (not HDF5, another layout version or vocabulary, corrupted)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def incomplete_message(path: str | Path) -> str:
    return (f"{path}: incomplete: the export was interrupted (the file was never finished); "
            "rerun the export with resume=true (or overwrite=true to start it again)")


def vocab_json() -> str:
    """The ``vocab`` attribute: the tokenizer's tokens in id order, as JSON."""
    return json.dumps(Tokenizer().tokens)
_NAME_RE = re.compile(r"[^A-Za-z0-9_.\-]")


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
    attentions: np.ndarray | None = None   # (layers, heads, L, L) float16
    apc: np.ndarray | None = None          # (layers, heads, L, L) float16
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    group: str = ""

    def __len__(self) -> int:
        return len(self.sequence)


def apc_maps(attentions: np.ndarray) -> np.ndarray:
    """``apc(symmetrize(A))`` for every map of a (..., L, L) stack, computed in float32."""
    from protein_performer.analysis.contacts import apc, symmetrize

    return apc(symmetrize(np.asarray(attentions, dtype=np.float32)))


class MapsWriter:
    """Write a maps file record by record (a context manager)::

        with MapsWriter(path, model_config=cfg, checkpoint_sha256=h, causal=False) as w:
            w.add("P12345", "MKT...", attentions, source="1abc.pdb:A", apc=True)

    Layer by layer (one layer's maps in memory): ``add_layers`` takes an iterable of layers;
    ``begin_layers`` returns a :class:`LayerRecord` to hand each layer to as it is computed.
    """

    def __init__(self, path: str | Path, model_config: dict | str | None = None,
                 checkpoint_sha256: str = "", causal: bool = False, compression: str | None = "gzip",
                 compression_opts: int | None = 1):
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

    def add(self, record_id: str, sequence: str, attentions: np.ndarray | None = None, *,
            tokens: np.ndarray | None = None, source: str = "", apc: np.ndarray | bool | None = None,
            mean: np.ndarray | None = None, per_token: np.ndarray | None = None) -> str:
        """Add one record; returns its group name. ``attentions``: (layers, heads, L, L).
        ``apc=True`` computes the APC maps from ``attentions`` (before the float16 cast); an array
        is stored as given."""
        L = len(sequence)
        for what, arr in (("attentions", attentions), ("apc", apc)):
            if isinstance(arr, np.ndarray) and (arr.ndim != 4 or arr.shape[2:] != (L, L)):
                raise ValueError(f"{record_id}: {what} shape {arr.shape}, expected (layers, heads, {L}, {L}) "
                                 "with the special tokens dropped")
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

    def add_layers(self, record_id: str, sequence: str, layers: Iterable[np.ndarray], n_layers: int,
                   n_heads: int, *, tokens: np.ndarray | None = None, source: str = "", apc: bool = True,
                   mean: np.ndarray | None = None, per_token: np.ndarray | None = None) -> str:
        """Add one record layer by layer (memory: one layer's maps): ``layers`` yields
        ``n_layers`` arrays (heads, L, L); with ``apc`` the APC maps are computed per layer.
        On any error (also one raised by ``layers``) the record is dropped."""
        with self.begin_layers(record_id, sequence, n_layers, n_heads, tokens=tokens, source=source, apc=apc,
                               mean=mean, per_token=per_token) as record:
            for layer in layers:
                record.write_layer(layer)
        return record.name

    def begin_layers(self, record_id: str, sequence: str, n_layers: int, n_heads: int, *,
                     tokens: np.ndarray | None = None, source: str = "", attentions: bool = True, apc: bool = True,
                     mean: np.ndarray | None = None, per_token: np.ndarray | None = None,
                     attrs: dict[str, Any] | None = None) -> "LayerRecord":
        """Start a record whose maps are handed over one layer at a time, in order, with
        :meth:`LayerRecord.write_layer` (for a producer that calls back per layer; an iterable of
        layers goes to :meth:`add_layers`). ``attentions`` / ``apc`` pick the datasets stored (neither:
        a record of tokens and embeddings only); ``attrs`` are extra attributes of the record's group.
        Use the record as a context manager: leaving it checks that all ``n_layers`` were written,
        and on any error the record is dropped (no half-written record stays behind)."""
        grp = self._new_group(record_id, sequence, tokens, source, mean, per_token)
        try:
            for key, value in (attrs or {}).items():
                grp.attrs[key] = value
            L = len(sequence)
            kw = dict(shape=(n_layers, n_heads, L, L), dtype=np.float16, chunks=(1, n_heads, L, L), **self._comp)
            datasets = {what: grp.create_dataset(what, **kw) for what, on in (("attentions", attentions), ("apc", apc))
                        if on}
        except BaseException:
            self.discard(grp.name)
            raise
        return LayerRecord(self, grp, record_id, L, n_layers, n_heads, datasets)

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

    def _new_group(self, record_id: str, sequence: str, tokens: np.ndarray | None, source: str,
                   mean: np.ndarray | None, per_token: np.ndarray | None) -> h5py.Group:
        L = len(sequence)
        if tokens is None:
            tokens = self._tokenizer.encode(sequence)
        tokens = np.asarray(tokens, dtype=np.uint8)
        if tokens.shape != (L,):
            raise ValueError(f"{record_id}: tokens shape {tokens.shape} != ({L},) of the sequence")
        per_token = self._per_token(record_id, L, per_token)
        name = sanitize_name(record_id)
        if name in self._h5:
            base, n = name, 2
            while f"{base}__{n}" in self._h5:
                n += 1
            name = f"{base}__{n}"
        grp = self._h5.create_group(name)
        grp.attrs["id"] = record_id
        grp.attrs["sequence"] = sequence
        grp.attrs["source"] = source or ""
        grp.create_dataset("tokens", data=tokens)
        self._write_embeddings(grp, mean, per_token)
        self.n_records += 1
        return grp

    def copy_record(self, src: h5py.Group) -> "LayerRecord":
        """Write a copy of the record ``src`` (a group of another maps file) with the same calls, in
        the same order, as export wrote it (:meth:`begin_layers` with the group's extra attributes
        in name order, each layer's stored maps, then the embeddings), so that a file rebuilt from
        copies is byte-identical to the original. Returns the finished record."""
        extra = {k: src.attrs[k] for k in sorted(src.attrs) if k not in _RECORD_ATTRS}
        stored = [w for w in ("attentions", "apc") if w in src]
        n_layers, n_heads = src[stored[0]].shape[:2] if stored else (0, 0)
        with self.begin_layers(_str(src.attrs["id"]), _str(src.attrs["sequence"]), n_layers, n_heads,
                               tokens=src["tokens"][()], source=_str(src.attrs.get("source", "")),
                               attentions="attentions" in src, apc="apc" in src, attrs=extra) as record:
            for n in range(n_layers):
                record.write_stored_layer(*(src[w][n] if w in src else None for w in ("attentions", "apc")))
            if "embeddings" in src:
                emb = src["embeddings"]
                record.add_embeddings(mean=emb["mean"][()] if "mean" in emb else None,
                                      per_token=emb["per_token"][()] if "per_token" in emb else None)
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

    def __enter__(self) -> "MapsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class LayerRecord:
    """A record of a :class:`MapsWriter` being written one layer at a time (from
    :meth:`MapsWriter.begin_layers`); a context manager that drops the record on any error."""

    def __init__(self, writer: MapsWriter, grp: h5py.Group, record_id: str, length: int, n_layers: int,
                 n_heads: int, datasets: dict[str, h5py.Dataset]):
        self.name = grp.name.lstrip("/")  # the group name, as MapsWriter.add returns it
        self.record_id = record_id
        self.length, self.n_layers, self.n_heads = length, n_layers, n_heads
        self.layers_written = 0
        self._writer, self._grp, self._datasets = writer, grp, datasets
        self._crc = {"record": _record_head_crc(grp), "attentions": 0, "apc": 0, "mean": 0, "per_token": 0}

    @property
    def checksum(self) -> str:
        """CRC-32s of what the record stored (see :func:`record_checksum`), as written."""
        return _checksum_str(self._crc)

    def write_layer(self, maps: np.ndarray) -> None:
        """Store the next layer's maps (heads, L, L), special tokens dropped: as float16, and their
        APC maps (computed from ``maps`` before the cast) where the record keeps them."""
        maps = np.asarray(maps)
        n, L = self.layers_written, self.length
        if n >= self.n_layers or maps.shape != (self.n_heads, L, L):
            raise ValueError(f"{self.record_id}: layer {n} shape {maps.shape}, expected {self.n_layers} "
                             f"layers of ({self.n_heads}, {L}, {L})")
        self.write_stored_layer(maps.astype(np.float16) if "attentions" in self._datasets else None,
                                apc_maps(maps).astype(np.float16) if "apc" in self._datasets else None)

    def write_stored_layer(self, attentions: np.ndarray | None, apc: np.ndarray | None) -> None:
        """Store the next layer as given (float16 arrays (heads, L, L), e.g. copied from another
        file); a dataset the record keeps needs its array."""
        n, L = self.layers_written, self.length
        for what, arr in (("attentions", attentions), ("apc", apc)):
            if what not in self._datasets:
                continue
            arr = np.ascontiguousarray(arr, dtype=np.float16)
            if n >= self.n_layers or arr.shape != (self.n_heads, L, L):
                raise ValueError(f"{self.record_id}: layer {n} {what} shape {arr.shape}, expected {self.n_layers} "
                                 f"layers of ({self.n_heads}, {L}, {L})")
            self._datasets[what][n] = arr
            self._crc[what] = zlib.crc32(arr.tobytes(), self._crc[what])
        self.layers_written = n + 1

    def add_embeddings(self, mean: np.ndarray | None = None, per_token: np.ndarray | None = None) -> None:
        """The record's embeddings, where they are known only after its maps (same checks and
        storage as :meth:`MapsWriter.add`'s ``mean`` / ``per_token``)."""
        per_token = self._writer._per_token(self.record_id, self.length, per_token)
        self._writer._write_embeddings(self._grp, mean, per_token)
        for what, arr in (("mean", mean), ("per_token", per_token)):
            if arr is not None:
                self._crc[what] = zlib.crc32(np.ascontiguousarray(arr, dtype=np.float32).tobytes())

    def __enter__(self) -> "LayerRecord":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._datasets and self.layers_written != self.n_layers:
            self._writer.discard(self.name)
            raise ValueError(f"{self.record_id}: got {self.layers_written} layers, expected {self.n_layers}")
        if exc_type is not None:
            self._writer.discard(self.name)  # no half-written record stays behind


_RECORD_ATTRS = ("id", "sequence", "source")


def _record_head_crc(grp: h5py.Group) -> int:
    """CRC-32 of a record's attributes (the extra ones in name order) and tokens."""
    head = json.dumps([[k, _plain_attr(grp.attrs[k])] for k in _RECORD_ATTRS if k in grp.attrs]
                      + [[k, _plain_attr(grp.attrs[k])] for k in sorted(grp.attrs) if k not in _RECORD_ATTRS])
    return zlib.crc32(np.ascontiguousarray(grp["tokens"][()], dtype=np.uint8).tobytes(), zlib.crc32(head.encode()))


def _plain_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    return v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v


def _checksum_str(crc: dict[str, int]) -> str:
    return "crc32:" + ":".join(f"{crc[k]:08x}" for k in ("record", "attentions", "apc", "mean", "per_token"))


def record_checksum(grp: h5py.Group) -> str:
    """CRC-32s of everything a record stores: attributes + tokens, the attention maps (layer by
    layer), the APC maps, the mean and per-token embeddings. Equal to the :attr:`LayerRecord.checksum`
    its writer computed, so export's resume can tell an intact record from a damaged one."""
    crc = {"record": _record_head_crc(grp), "attentions": 0, "apc": 0, "mean": 0, "per_token": 0}
    for what in ("attentions", "apc"):
        if what in grp:
            ds = grp[what]
            for n in range(ds.shape[0]):
                crc[what] = zlib.crc32(np.ascontiguousarray(ds[n], dtype=np.float16).tobytes(), crc[what])
    if "embeddings" in grp:
        for what in ("mean", "per_token"):
            if what in grp["embeddings"]:
                arr = np.ascontiguousarray(grp["embeddings"][what][()], dtype=np.float32)
                crc[what] = zlib.crc32(arr.tobytes())
    return _checksum_str(crc)


def write_maps(path: str | Path, records: Iterable[MapsRecord | dict], model_config: dict | None = None,
               checkpoint_sha256: str = "", causal: bool = False, apc: bool = False) -> int:
    """Write records (:class:`MapsRecord` or dicts with its field names) to ``path``; returns the
    count. ``apc=True`` computes the APC maps of records that carry none."""
    with MapsWriter(path, model_config, checkpoint_sha256, causal) as w:
        for r in records:
            d = r if isinstance(r, dict) else r.__dict__
            emb = d.get("embeddings") or {}
            rec_apc = d.get("apc")
            w.add(d["id"], d["sequence"], d.get("attentions"), tokens=d.get("tokens"),
                  source=d.get("source", ""), apc=rec_apc if rec_apc is not None else (apc or None),
                  mean=emb.get("mean", d.get("mean")), per_token=emb.get("per_token", d.get("per_token")))
        return w.n_records


class MapsFile:
    """Read a maps file lazily: ``len``, ``ids``, ``[id]`` and iteration load one group at a time.

    ``attrs``: ``model_config`` (dict), ``checkpoint_sha256``, ``causal``, ``format_version``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise MapsFormatError(f"{self.path}: is a directory, but a maps.h5 file is expected here")
        if not self.path.is_file():
            raise MissingFileError(f"maps file not found: {self.path}")
        if self.path.name.endswith(PARTIAL_SUFFIX):
            raise IncompleteOutputError(incomplete_message(self.path))
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise MapsFormatError(f"{self.path}: not an HDF5 maps file, or a truncated / corrupted one "
                                  f"({_first_line(e)}); export it again") from e
        try:
            self._check_header()
            self.groups = list(self._h5.keys())
            self._by_id = {_str(self._h5[g].attrs["id"]): g for g in self.groups}
            self._id_by_source = {}
            for g in self.groups:
                src = _str(self._h5[g].attrs.get("source", ""))
                if src:
                    self._id_by_source.setdefault(src, _str(self._h5[g].attrs["id"]))
        except UserError:
            self._h5.close()
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as e:  # h5py's errors on damaged metadata
            self._h5.close()
            raise MapsFormatError(f"{self.path}: corrupted maps file ({_first_line(e)}); export it again") from e

    def _check_header(self) -> None:
        attrs = self._h5.attrs
        if INCOMPLETE_ATTR in attrs:
            raise IncompleteOutputError(incomplete_message(self.path))
        version = attrs.get("format_version")
        if version is None or int(version) != FORMAT_VERSION:
            raise MapsFormatError(f"{self.path}: format_version {version!r}, this reader knows {FORMAT_VERSION}; "
                                  "export the maps again with this version")
        vocab = attrs.get(VOCAB_ATTR)
        self._vocab_checked = vocab is not None
        if vocab is not None and json.loads(_str(vocab)) != Tokenizer().tokens:
            raise MapsFormatError(f"{self.path}: written with another tokenizer vocabulary ({_str(vocab)[:80]}...), "
                                  f"not this one ({len(Tokenizer().tokens)} tokens); export the maps again with "
                                  "this version of protein_performer")
        self.attrs = {
            "format_version": int(version),
            "model_config": json.loads(_str(attrs.get("model_config", "{}")) or "{}"),
            "checkpoint_sha256": _str(attrs.get("checkpoint_sha256", "")),
            "causal": bool(attrs.get("causal", False)),
        }
        self.export_info: dict = _json_or_empty(attrs.get("export"))  # what export_attention recorded (checkpoint, ...)

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    def __len__(self) -> int:
        return len(self.groups)

    def find(self, source: str = "", record_id: str = "") -> str | None:
        """The id of the record with this ``source`` attribute, else with this id, else None."""
        if source and source in self._id_by_source:
            return self._id_by_source[source]
        return record_id if record_id in self._by_id else None

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._by_id

    def read(self, record_id: str, load: Sequence[str] = ("attentions", "apc", "embeddings"),
             layers: Sequence[int] | None = None) -> MapsRecord:
        """One record; ``load`` picks what to read besides the ids, ``layers`` a subset of layers."""
        if record_id not in self._by_id:
            raise KeyError(f"{self.path}: no record {record_id!r}")
        return self._read_group(self._by_id[record_id], load, layers)

    __getitem__ = read

    def _read_group(self, name: str, load: Sequence[str], layers: Sequence[int] | None) -> MapsRecord:
        try:
            rec = self._read_group_unchecked(name, load, layers)
        except UserError:
            raise
        except (OSError, KeyError, RuntimeError) as e:  # h5py: a damaged chunk, heap or header
            raise MapsFormatError(f"{self.path} group {name}: unreadable, the file is corrupted "
                                  f"({_first_line(e)}); export it again") from e
        if not self._vocab_checked:  # no vocab attribute: the tokens must be this tokenizer's ids
            expected = _TOKENIZER.encode(rec.sequence)
            if rec.tokens.shape != expected.shape or not np.array_equal(rec.tokens, expected):
                raise MapsFormatError(f"{self.path} record {rec.id}: its tokens are not this tokenizer's ids for "
                                      "its sequence (a file from another tokenizer / vocabulary); export the maps "
                                      "again with this version of protein_performer")
        return rec

    def _read_group_unchecked(self, name: str, load: Sequence[str], layers: Sequence[int] | None) -> MapsRecord:
        g = self._h5[name]
        seq = _str(g.attrs["sequence"])
        rec = MapsRecord(id=_str(g.attrs["id"]), sequence=seq, tokens=g["tokens"][()],
                         source=_str(g.attrs.get("source", "")), group=name)
        L = len(seq)
        sel = slice(None) if layers is None else sorted(int(i) for i in layers)
        for what in ("attentions", "apc"):
            if what in load and what in g:
                ds = g[what]
                if ds.ndim != 4 or ds.shape[2:] != (L, L):
                    raise MapsFormatError(f"{self.path} group {name}: {what} shape {ds.shape} does not fit "
                                     f"the sequence length {L}")
                setattr(rec, what, ds[sel])
        if "embeddings" in load and "embeddings" in g:
            rec.embeddings = {k: v[()] for k, v in g["embeddings"].items()}
        return rec

    def __iter__(self) -> Iterator[MapsRecord]:
        return self.iter()

    def iter(self, load: Sequence[str] = ("attentions", "apc", "embeddings"),
             layers: Sequence[int] | None = None) -> Iterator[MapsRecord]:
        for name in self.groups:
            yield self._read_group(name, load, layers)

    def close(self) -> None:
        if self._h5.id.valid:
            self._h5.close()

    def __enter__(self) -> "MapsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_maps(path: str | Path, load: Sequence[str] = ("attentions", "apc", "embeddings"),
              layers: Sequence[int] | None = None) -> Iterator[MapsRecord]:
    """Iterate over the records of a maps file, one group in memory at a time."""
    with MapsFile(path) as f:
        yield from f.iter(load=load, layers=layers)


def _json_or_empty(v: Any) -> dict:
    """The JSON object of an attribute such as ``export`` (what produced the file), or {}."""
    try:
        d = json.loads(_str(v)) if v is not None else {}
    except (TypeError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_TOKENIZER = Tokenizer(unknown="X")
