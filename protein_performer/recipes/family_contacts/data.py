"""Span masking for the family-contacts recipe: BERT's 80/10/10 masking with the targets in runs of
``span`` residues (span starts ~ Bernoulli(mask_prob / span) over residue positions), as a Collator
and a DataModule (``data._target_=protein_performer.recipes.family_contacts.data.FamilyDataModule
+data.span=5``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protein_performer.data.collate import _TOK, IGNORE_INDEX, Collator, bid_window, item_rng
from protein_performer.data.datamodule import ProteinDataModule

MASKED_BELOW = 0.8  # a selected residue with u < 0.8 becomes the mask token,
RANDOM_BELOW = 0.9  # with 0.8 <= u < 0.9 a random residue; the rest keep their residue


def mask_spans(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mask_prob: float,
    span: int,
    mask_id: int,
    first_residue_id: int,
    replacement_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Like BERT masking (collate.mask_tokens: 80/10/10, at least one target) but the selected
    residues come in runs of ``span``: span starts ~ Bernoulli(mask_prob / span) over residue
    positions, each masking ``[start, start + span)`` (clipped), so about ``mask_prob`` of the
    residues are targets (a little less where runs overlap). A masked residue's neighbours are
    then masked too: its context is the rest of the fold, not the sequence next to it."""
    tokens = np.asarray(tokens, dtype=np.int64)
    residue_pos = np.flatnonzero(tokens >= first_residue_id)
    out = tokens.copy()
    targets = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    n = residue_pos.size
    if n == 0:
        return out, targets
    starts = np.flatnonzero(rng.random(n) < mask_prob / span)
    if starts.size == 0:
        starts = rng.integers(0, n, size=1)
    selected_mask = np.zeros(n, dtype=bool)
    for start in starts:
        selected_mask[start : start + span] = True
    selected = residue_pos[selected_mask]
    targets[selected] = tokens[selected]
    u = rng.random(selected.size)
    out[selected[u < MASKED_BELOW]] = mask_id
    to_random = selected[(u >= MASKED_BELOW) & (u < RANDOM_BELOW)]
    out[to_random] = rng.choice(np.asarray(replacement_ids, dtype=np.int64), size=to_random.size)
    return out, targets


@dataclass
class SpanCollator(Collator):
    """Collator whose BID examples are span-masked (:func:`mask_spans`)."""

    span: int = 1

    def example(self, item, index, epoch):
        if self.span <= 1 or self.objective != "bid" or self.packed:
            return super().example(item, index, epoch)
        rng = item_rng(self.seed, epoch, index)
        window = bid_window(item, self.max_length, rng if self.train else None, _TOK.bos_id, _TOK.eos_id)
        return mask_spans(window, rng, self.mask_prob, self.span, _TOK.mask_id, _TOK.n_special, self.replacement_ids)


class FamilyDataModule(ProteinDataModule):
    """ProteinDataModule with ``span``-masking (``span=1``: the library's BERT masking).
    ``data._target_=protein_performer.recipes.family_contacts.data.FamilyDataModule +data.span=5``"""

    def __init__(self, *args, span: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.span = int(span)

    def collator(self, train: bool):
        base = super().collator(train)
        return SpanCollator(**{f: getattr(base, f) for f in base.__dataclass_fields__}, span=self.span)
