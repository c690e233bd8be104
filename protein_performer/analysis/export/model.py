"""Export, the model side: one sequence through a loaded model (:func:`run_sequence`), its maps
handed out one layer at a time; the model comes from :func:`protein_performer.pretrained.load_model`.

Model input per sequence of L residues ``s``: ``Tokenizer.frame`` (as in training): BID
``[bos, s, eos]``, UNI ``[bos, s]`` (a UNI model never sees eos as input). The maps are
``PerformerLM.attention_maps``: the model's own ``attention_matrix`` on the queries and keys of
every layer (``model.eval()``, no redraw): for FAVOR+ ``D^-1 Q' (K')^T`` (causally masked for
UNI), for the exact baseline ``softmax(Q K^T / sqrt(d))``. Rows and columns of the special tokens
are dropped, so every map is L x L.
"""

from __future__ import annotations

import numpy as np
import torch

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import UserError
from protein_performer.model.performer import PerformerLM


class ExportError(UserError, ValueError):
    """A bad input, output path or setting of the export (one line: file, what to do)."""


# ------------------------------------------------------------------------------ one sequence through it
@torch.no_grad()
def run_sequence(
    model: PerformerLM,
    residues: np.ndarray,
    on_layer=None,
    want_repr: bool = False,
    device: str | torch.device | None = None,
) -> torch.Tensor | None:
    """Run one sequence (residue ids, no special tokens) through ``model``, framed by
    :meth:`Tokenizer.frame`.

    ``on_layer(layer, maps)`` is called once per layer, in order, with that layer's maps
    ``(heads, L, L)`` float32 (special tokens dropped): :meth:`PerformerLM.attention_maps`, one
    layer at a time. Returns the final representation ``(L, dim)`` (after the final LayerNorm,
    :meth:`PerformerLM.representations`) when ``want_repr``, from the same pass.
    """
    if model.training:
        raise RuntimeError("export needs model.eval(): maps come from the model's fixed features")
    device = device if device is not None else next(model.parameters()).device
    ids, keep = Tokenizer().frame(residues, bool(model.config.causal))
    tokens = torch.as_tensor(ids, device=device)[None]  # (1, T)
    if not want_repr:
        for layer, maps in model.attention_maps(tokens, layers=None if on_layer is not None else ()):
            on_layer(layer, maps[0, :, keep, keep])
            del maps  # one layer's maps in memory: these are gone before the next layer's are made
        return None
    depth = len(model.blocks)
    for layer, x in enumerate(model.hidden_states(tokens)):  # maps and representation in one pass
        if on_layer is not None and layer < depth:
            on_layer(layer, model.layer_attention(layer, x)[0, :, keep, keep])
    return x[0, keep]
