"""Attention maps (and embeddings) out of a trained model: checkpoint -> maps.h5.

The maps are the model's own ``attention_matrix`` on the queries and keys of every layer, with the
features the checkpoint holds (``model.eval()``, no redraw): for FAVOR+ that is the paper's
``V = I`` construction, ``D^-1 Q' (K')^T``, causally masked for a UNI model; for the exact
baseline ``softmax(Q K^T / sqrt(d))``. Rows and columns of the special tokens are dropped, so
every map is L x L (rows need not sum to 1: the mass on bos / eos is left out, as in ESM).
Embeddings (``include`` ``mean`` / ``per_token``): the final layer's representation after the
final LayerNorm, per residue and mean-pooled over the residues (ESM's ``extract.py``).

This module is the public import path; the code lives in:

- :mod:`~protein_performer.analysis.export_model`: checkpoint -> :class:`LoadedModel`, and
  :func:`run_sequence` (one sequence, its maps one layer at a time);
- :mod:`~protein_performer.analysis.export_inputs`: FASTA / structure input, crop, include;
- :mod:`~protein_performer.analysis.export_run`: :func:`export_attention` and :func:`run_export`;
- :mod:`~protein_performer.analysis.export_journal`: the partial file, its journal, ``resume``;
- :mod:`~protein_performer.analysis.export_output`: output path and free-space checks.

The file layout is :mod:`protein_performer.analysis.maps_io`'s; export adds the root attribute
``export`` (JSON: checkpoint, seed, input, include, crop, counts).
"""

from __future__ import annotations

from protein_performer.analysis.export_inputs import (
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
from protein_performer.analysis.export_journal import ExportJournal, partial_paths
from protein_performer.analysis.export_model import (
    RANDOM,
    ExportError,
    LoadedModel,
    file_sha256,
    load_model,
    model_config_from,
    run_sequence,
)
from protein_performer.analysis.export_run import ExportCounts, export_attention, run_export
from protein_performer.analysis.export_tiles import MapSelection

__all__ = [
    "CROPS",
    "INCLUDE",
    "RANDOM",
    "ExportCounts",
    "ExportError",
    "ExportJournal",
    "InputReport",
    "LoadedModel",
    "MapSelection",
    "SequenceRecord",
    "crop_window",
    "export_attention",
    "file_sha256",
    "input_key",
    "is_structure_input",
    "load_model",
    "model_config_from",
    "parse_include",
    "partial_paths",
    "read_sequences",
    "run_export",
    "run_sequence",
]
