"""Attention maps (and embeddings) out of a trained model: checkpoint -> maps.h5.

The maps are the model's own ``attention_matrix`` on the queries and keys of every layer, with the
features the checkpoint holds (``model.eval()``, no redraw): for FAVOR+ that is the paper's
``V = I`` construction, ``D^-1 Q' (K')^T``, causally masked for a UNI model; for the exact
baseline ``softmax(Q K^T / sqrt(d))``. Rows and columns of the special tokens are dropped, so
every map is L x L (rows need not sum to 1: the mass on bos / eos is left out, as in ESM).
Embeddings (``include`` ``mean`` / ``per_token``): the final layer's representation after the
final LayerNorm, per residue and mean-pooled over the residues (ESM's ``extract.py``).

The package's public names are imported from here (the model comes from
:func:`protein_performer.pretrained.load_model`); the code lives in:

- :mod:`~protein_performer.analysis.export.model`: :class:`ExportError` and
  :func:`run_sequence` (one sequence, its maps one layer at a time);
- :mod:`~protein_performer.analysis.export.inputs`: FASTA / structure input, crop, include;
- :mod:`~protein_performer.analysis.export.run`: :func:`export_attention` and :func:`run_export`;
- :mod:`~protein_performer.analysis.export.journal`: the partial file, its journal, ``resume``
  (the protocol is :class:`protein_performer.outputs_h5.ResumableH5`'s);
- :mod:`~protein_performer.analysis.export.summary`: :class:`ExportCounts`, :class:`ExportSummary`;
- :mod:`~protein_performer.analysis.export.output`: output path and free-space checks;
- :mod:`~protein_performer.analysis.export.tiles`: :class:`MapSelection` (``layers`` / ``heads`` /
  ``reduce`` / ``top`` / ``min_sep`` / ``tile``) and one sequence's maps from tiles of each layer's
  features.

The file layout is :mod:`protein_performer.analysis.maps`'s; export adds the root attribute
``export`` (JSON: checkpoint, seed, input, include, crop, counts).
"""

from __future__ import annotations

from protein_performer.analysis.export.inputs import (
    CROPS,
    INCLUDE,
    InputReport,
    SequenceRecord,
    crop_window,
    input_key,
    is_structure_input,
    parse_include,
    read_sequences,
)
from protein_performer.analysis.export.journal import ExportJournal, partial_paths
from protein_performer.analysis.export.model import ExportError, run_sequence
from protein_performer.analysis.export.run import export_attention, run_export
from protein_performer.analysis.export.summary import ExportCounts, ExportSummary
from protein_performer.analysis.export.tiles import MapSelection

__all__ = [
    "CROPS",
    "INCLUDE",
    "ExportCounts",
    "ExportSummary",
    "ExportError",
    "ExportJournal",
    "InputReport",
    "MapSelection",
    "SequenceRecord",
    "crop_window",
    "export_attention",
    "input_key",
    "is_structure_input",
    "parse_include",
    "partial_paths",
    "read_sequences",
    "run_export",
    "run_sequence",
]
