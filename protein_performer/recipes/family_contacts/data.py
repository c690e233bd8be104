"""Span masking and sequence weights for the family-contacts recipe: BERT's 80/10/10 masking with the
targets in runs of ``span`` residues (span starts ~ Bernoulli(mask_prob / span) over residue
positions), as a Collator and a DataModule (``data._target_=protein_performer.recipes.family_contacts.data.FamilyDataModule
+data.span=5``).

Sequence weights drive the sampler, not the loss: with ``data.weights=<weights.tsv>`` (``id<TAB>weight``
per sequence, a header line first; the family-contacts tool writes the DCA weights of
:func:`.msa.sequence_weights` there) each training epoch draws its ``n`` items with replacement,
item ``i`` with probability ``w_i / sum(w)`` (:class:`WeightedBatchSampler`), so a cluster of near
copies is seen about as often as one sequence, and the loss stays the plain mean over masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein_performer.data.collate import _TOK, IGNORE_INDEX, Collator, bid_window, item_rng
from protein_performer.data.datamodule import BatchSampler, DataSetupError, ProteinDataModule

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


def read_weights(path: str | Path) -> dict[str, float]:
    """``id -> weight`` of a weights TSV (header line ``id<TAB>weight``; every weight > 0)."""
    path = Path(path)
    if not path.is_file():
        raise DataSetupError(f"data.weights: {path} not found (a TSV of id<TAB>weight)")
    out: dict[str, float] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], 2):
        rid, _, value = line.partition("\t")
        try:
            out[rid] = float(value)
        except ValueError:
            raise DataSetupError(f"{path}: line {number}: expected id<TAB>weight, got {line!r}") from None
        if not out[rid] > 0:
            raise DataSetupError(f"{path}: line {number}: weight of {rid!r} must be > 0, got {value}")
    return out


class WeightedBatchSampler(BatchSampler):
    """:class:`BatchSampler` whose epoch order is ``n`` draws with replacement, item ``i`` with
    probability ``weights[i] / sum(weights)``, seeded by ``[seed, epoch]`` (the same on every rank,
    which then take their parts of it as the base sampler deals them)."""

    def __init__(self, n: int, weights: np.ndarray, **kwargs):
        super().__init__(n, **kwargs)
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.n,) or not np.all(weights > 0):
            raise ValueError(f"weights: expected {self.n} positive values, got shape {weights.shape}")
        self.probabilities = weights / weights.sum()

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.choice(self.n, size=self.n, replace=True, p=self.probabilities)


class FamilyDataModule(ProteinDataModule):
    """ProteinDataModule with ``span``-masking (``span=1``: the library's BERT masking) and, with
    ``weights`` (a TSV naming every training sequence's id), the weighted training sampler.
    ``data._target_=protein_performer.recipes.family_contacts.data.FamilyDataModule +data.span=5``"""

    def __init__(self, *args, span: int = 1, weights: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.span = int(span)
        self.weights = str(weights) if weights else None

    def item_weights(self, split: str) -> np.ndarray:
        """The weight of every item of ``split``, in its order, from the ``weights`` TSV."""
        table = read_weights(self.weights)
        ds = self._dataset(split)
        ids = [ds.get_id(i) for i in range(len(ds))]
        ds.close()  # the loader hands the dataset to workers closed
        missing = [rid for rid in ids if rid not in table]
        if missing:
            raise DataSetupError(
                f"{self.weights}: no weight for {len(missing)} {split} sequence(s), e.g. {missing[0]!r}"
            )
        return np.array([table[rid] for rid in ids])

    def sampler(self, split: str, train: bool) -> BatchSampler:
        base = super().sampler(split, train)
        if not (train and self.weights):
            return base
        weighted = WeightedBatchSampler(
            base.n,
            self.item_weights(split),
            batch_size=base.batch_size,
            seed=base.seed,
            rank=base.rank,
            world_size=base.world_size,
            drop_last=base.drop_last,
            lengths=base.lengths,
            max_tokens=base.max_tokens,
            pad_to_multiple_of=base.pad_to_multiple_of,
            megabatch_size=base.megabatch_size,
            key_epoch=base.key_epoch,
        )
        weighted.set_epoch(base.epoch)
        return weighted

    def collator(self, train: bool):
        base = super().collator(train)
        return SpanCollator(**{f: getattr(base, f) for f in base.__dataclass_fields__}, span=self.span)
