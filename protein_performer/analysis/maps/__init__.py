"""maps.h5: the attention maps (and embeddings) of a model for a set of sequences.

The maps file's package; its public names are imported from here (``from
protein_performer.analysis.maps import MapsFile``). The code lives in:

- :mod:`~protein_performer.analysis.maps.format`: the layout (documented there), constants,
  errors, :class:`MapsRecord`, :func:`sanitize_name` and the record checksums;
- :mod:`~protein_performer.analysis.maps.writer`: :class:`MapsWriter`, :class:`LayerRecord`,
  :func:`write_maps`;
- :mod:`~protein_performer.analysis.maps.reader`: :class:`MapsFile`, :func:`read_maps`;
- :mod:`~protein_performer.analysis.maps.ops`: :func:`apc_maps` (``apc(symmetrize(A))``);
- :mod:`~protein_performer.analysis.maps.tiles`: the same maps and their sums, APC, head means and
  top pairs computed in row tiles from one layer's features (never an L x L x heads stack).
"""

from __future__ import annotations

from protein_performer.analysis.maps.format import (
    FORMAT_VERSION,
    INCOMPLETE_ATTR,
    INCOMPLETE_VALUE,
    LAYOUT_ATTRS,
    VOCAB_ATTR,
    MapsFormatError,
    MapsRecord,
    incomplete_message,
    record_checksum,
    sanitize_name,
    vocab_json,
)
from protein_performer.analysis.maps.ops import apc_maps
from protein_performer.analysis.maps.reader import MapsFile, read_maps
from protein_performer.analysis.maps.writer import LayerRecord, MapsWriter, write_maps
from protein_performer.errors import MissingFileError

__all__ = [
    "FORMAT_VERSION",
    "INCOMPLETE_ATTR",
    "INCOMPLETE_VALUE",
    "LAYOUT_ATTRS",
    "PARTIAL_SUFFIX",
    "VOCAB_ATTR",
    "LayerRecord",
    "MapsFile",
    "MapsFormatError",
    "MapsRecord",
    "MapsWriter",
    "MissingFileError",
    "apc_maps",
    "incomplete_message",
    "read_maps",
    "record_checksum",
    "sanitize_name",
    "vocab_json",
    "write_maps",
]
