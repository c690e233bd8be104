"""maps.h5, the reader: :class:`MapsFile` opens a file, checks its header (layout version,
vocabulary, completion marker) and reads one record group at a time; :func:`read_maps` iterates
over the records. The layout is :mod:`protein_performer.analysis.maps.format`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from protein_performer.analysis.maps.format import (
    FORMAT_VERSION,
    INCOMPLETE_ATTR,
    VOCAB_ATTR,
    MapsFormatError,
    MapsRecord,
    attr_str,
    incomplete_message,
    json_or_empty,
)
from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import IncompleteOutputError, MissingFileError, UserError, first_line
from protein_performer.outputs_h5 import PARTIAL_SUFFIX

__all__ = ["MapsFile", "read_maps"]

ALL_PARTS = ("attentions", "apc", "embeddings", "apc_mean", "contacts")  # what a record holds besides its ids
_TOKENIZER = Tokenizer(unknown="X")


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
            raise MapsFormatError(
                f"{self.path}: not an HDF5 maps file, or a truncated / corrupted one ({first_line(e)}); export it again"
            ) from e
        try:
            self._check_header()
            self.groups = list(self._h5.keys())
            self._by_id = {attr_str(self._h5[g].attrs["id"]): g for g in self.groups}
            self._id_by_source = {}
            for g in self.groups:
                src = attr_str(self._h5[g].attrs.get("source", ""))
                if src:
                    self._id_by_source.setdefault(src, attr_str(self._h5[g].attrs["id"]))
        except UserError:
            self._h5.close()
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as e:  # h5py's errors on damaged metadata
            self._h5.close()
            raise MapsFormatError(f"{self.path}: corrupted maps file ({first_line(e)}); export it again") from e

    def _check_header(self) -> None:
        attrs = self._h5.attrs
        if INCOMPLETE_ATTR in attrs:
            raise IncompleteOutputError(incomplete_message(self.path))
        version = attrs.get("format_version")
        if version is None or int(version) != FORMAT_VERSION:
            raise MapsFormatError(
                f"{self.path}: format_version {version!r}, this reader knows {FORMAT_VERSION}; "
                "export the maps again with this version"
            )
        vocab = attrs.get(VOCAB_ATTR)
        self._vocab_checked = vocab is not None
        if vocab is not None and json.loads(attr_str(vocab)) != Tokenizer().tokens:
            raise MapsFormatError(
                f"{self.path}: written with another tokenizer vocabulary ({attr_str(vocab)[:80]}...), "
                f"not this one ({len(Tokenizer().tokens)} tokens); export the maps again with "
                "this version of protein_performer"
            )
        self.attrs = {
            "format_version": int(version),
            "model_config": json.loads(attr_str(attrs.get("model_config", "{}")) or "{}"),
            "checkpoint_sha256": attr_str(attrs.get("checkpoint_sha256", "")),
            "causal": bool(attrs.get("causal", False)),
        }
        self.export_info: dict = json_or_empty(attrs.get("export"))  # what export_attention recorded (checkpoint, ...)

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

    def read(self, record_id: str, load: Sequence[str] = ALL_PARTS, layers: Sequence[int] | None = None) -> MapsRecord:
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
            raise MapsFormatError(
                f"{self.path} group {name}: unreadable, the file is corrupted ({first_line(e)}); export it again"
            ) from e
        if not self._vocab_checked:  # no vocab attribute: the tokens must be this tokenizer's ids
            expected = _TOKENIZER.encode(rec.sequence)
            if rec.tokens.shape != expected.shape or not np.array_equal(rec.tokens, expected):
                raise MapsFormatError(
                    f"{self.path} record {rec.id}: its tokens are not this tokenizer's ids for "
                    "its sequence (a file from another tokenizer / vocabulary); export the maps "
                    "again with this version of protein_performer"
                )
        return rec

    def _read_group_unchecked(self, name: str, load: Sequence[str], layers: Sequence[int] | None) -> MapsRecord:
        g = self._h5[name]
        seq = attr_str(g.attrs["sequence"])
        rec = MapsRecord(
            id=attr_str(g.attrs["id"]),
            sequence=seq,
            tokens=g["tokens"][()],
            source=attr_str(g.attrs.get("source", "")),
            group=name,
        )
        L = len(seq)
        sel = slice(None) if layers is None else sorted(int(i) for i in layers)
        for what in ("attentions", "apc"):
            if what in load and what in g:
                ds = g[what]
                if ds.ndim != 4 or ds.shape[2:] != (L, L):
                    raise MapsFormatError(
                        f"{self.path} group {name}: {what} shape {ds.shape} does not fit the sequence length {L}"
                    )
                setattr(rec, what, ds[sel])
        if "apc_mean" in load and "apc_mean" in g:
            rec.apc_mean = g["apc_mean"][()]
        if "contacts" in load and "contacts" in g:
            rec.contacts = {k: v[()] for k, v in g["contacts"].items()}
        if "embeddings" in load and "embeddings" in g:
            rec.embeddings = {k: v[()] for k, v in g["embeddings"].items()}
        return rec

    def __iter__(self) -> Iterator[MapsRecord]:
        return self.iter()

    def iter(self, load: Sequence[str] = ALL_PARTS, layers: Sequence[int] | None = None) -> Iterator[MapsRecord]:
        for name in self.groups:
            yield self._read_group(name, load, layers)

    def close(self) -> None:
        if self._h5.id.valid:
            self._h5.close()

    def __enter__(self) -> MapsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_maps(
    path: str | Path, load: Sequence[str] = ALL_PARTS, layers: Sequence[int] | None = None
) -> Iterator[MapsRecord]:
    """Iterate over the records of a maps file, one group in memory at a time."""
    with MapsFile(path) as f:
        yield from f.iter(load=load, layers=layers)
