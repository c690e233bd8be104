"""Cropping, masking, padding and batching: from token arrays to the training batch.

Batch contract (what the model and the Lightning module rely on), for ``b`` items padded to ``L``:

``tokens``            LongTensor (b, L)  model input, pad id 0 after each item's end
``targets``           LongTensor (b, L)  label per position, ``-100`` = ignored by the loss
``key_padding_mask``  BoolTensor (b, L)  True at padding
``index``             LongTensor (b,)    dataset index of each item (sequence, or block when packing)
``lengths``           LongTensor (b,)    unpadded length of each item

UNI (next-token prediction). With ``c = [bos, s_0 .. s_{n-1}, eos]`` (``n + 2`` tokens), an item
of length ``L = min(max_length, n + 1)`` starting at ``j`` is ``tokens = c[j : j + L]`` and
``targets = c[j + 1 : j + L + 1]``. Uncropped (``j = 0``, ``L = n + 1``) that is
``tokens = [bos, s_0 .. s_{n-1}]``, ``targets = [s_0 .. s_{n-1}, eos]``. Packed blocks ``x``
(``B`` stream tokens) give ``tokens = [bos, x_0 .. x_{B-2}]``, ``targets = x``: every block token
is predicted exactly once.

BID (masked LM, BERT recipe). An item is ``w = c[j : j + L]`` with ``L = min(max_length, n + 2)``,
or a packed block as is. Each *residue* position (id >= 4; never pad, bos, eos, mask) is selected
independently with probability ``mask_prob`` (0.15); when none is selected, one residue position is
drawn uniformly, so every item with a residue has at least one target. Of the selected positions,
80% become ``<mask>``, 10% a random residue drawn uniformly from ``replacement_ids`` (the tokenizer's
25 residue ids by default; it may equal the original, as in BERT) and 10% stay unchanged.
``targets`` holds the original token at the selected positions and ``-100`` elsewhere.

Cropping: items longer than ``max_length`` (special tokens included) are cut to a window at a
random start ``j`` in training and at ``j = 0`` in evaluation.

Determinism: every random choice for an item comes from
``np.random.default_rng([seed, epoch, index])``, so a batch depends on (seed, epoch, index) only,
never on the worker that builds it or on how the run was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .tokenizer import Tokenizer

IGNORE_INDEX = -100
_TOK = Tokenizer()


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of all random choices for one item in one epoch."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def crop_start(total: int, window: int, rng: np.random.Generator | None) -> int:
    """Start of a ``window``-long crop of ``total`` tokens: uniform over ``0 .. total - window``
    with ``rng``, ``0`` without (evaluation)."""
    if total <= window or rng is None:
        return 0
    return int(rng.integers(0, total - window + 1))


def uni_example(
    residues: np.ndarray, max_length: int, rng: np.random.Generator | None, bos_id: int = 1, eos_id: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) of one sequence for next-token prediction (see the module docstring)."""
    n = residues.size
    c = np.empty(n + 2, dtype=np.int64)
    c[0], c[1:-1], c[-1] = bos_id, residues, eos_id
    length = min(max_length, n + 1)
    j = crop_start(n + 1, length, rng)
    return c[j : j + length], c[j + 1 : j + length + 1]


def uni_block(block: np.ndarray, bos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) of one packed block: the block shifted right behind a bos."""
    x = block.astype(np.int64)
    tokens = np.empty_like(x)
    if x.size:
        tokens[0] = bos_id
        tokens[1:] = x[:-1]
    return tokens, x


def bid_window(
    residues: np.ndarray, max_length: int, rng: np.random.Generator | None, bos_id: int = 1, eos_id: int = 2
) -> np.ndarray:
    """``[bos, s, eos]`` cropped to ``max_length`` (random start with ``rng``, else the start)."""
    n = residues.size
    c = np.empty(n + 2, dtype=np.int64)
    c[0], c[1:-1], c[-1] = bos_id, residues, eos_id
    length = min(max_length, n + 2)
    j = crop_start(n + 2, length, rng)
    return c[j : j + length]


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mask_prob: float = 0.15,
    mask_id: int = 3,
    first_residue_id: int = 4,
    replacement_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of the residue positions of ``tokens`` -> (masked tokens, targets).

    Selection ~ Bernoulli(mask_prob) per residue position (at least one); then 80/10/10
    mask / random residue / unchanged. Targets: original id at selected positions, -100 elsewhere.
    """
    if replacement_ids is None:
        replacement_ids = _TOK.residue_ids
    tokens = np.asarray(tokens, dtype=np.int64)
    residue_pos = np.flatnonzero(tokens >= first_residue_id)
    out = tokens.copy()
    targets = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    if residue_pos.size == 0:
        return out, targets
    selected = residue_pos[rng.random(residue_pos.size) < mask_prob]
    if selected.size == 0:
        selected = residue_pos[rng.integers(0, residue_pos.size, size=1)]
    targets[selected] = tokens[selected]
    u = rng.random(selected.size)
    to_mask = selected[u < 0.8]
    to_random = selected[(u >= 0.8) & (u < 0.9)]
    out[to_mask] = mask_id
    out[to_random] = rng.choice(np.asarray(replacement_ids, dtype=np.int64), size=to_random.size)
    return out, targets


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def pad_stack(rows: Sequence[np.ndarray], fill: int, length: int) -> torch.Tensor:
    out = np.full((len(rows), length), fill, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : row.size] = row
    return torch.from_numpy(out)


@dataclass
class Collator:
    """Turns a list of token arrays (sequences, or packed blocks when ``packed``) into a batch.

    ``train`` selects random crops; masking is random in both modes (seeded by item, see the
    module docstring; evaluation loaders use a fixed epoch so their masks never change).
    Items are padded to the longest in the batch, rounded up to ``pad_to_multiple_of`` but never
    beyond ``max(max_length, longest)``.
    """

    objective: str = "bid"
    max_length: int = 1024
    mask_prob: float = 0.15
    train: bool = True
    seed: int = 0
    packed: bool = False
    pad_to_multiple_of: int = 1
    replacement_ids: np.ndarray = field(default_factory=lambda: _TOK.residue_ids.copy())

    def __post_init__(self):
        if self.objective not in ("uni", "bid"):
            raise ValueError(f"objective must be 'uni' or 'bid', got {self.objective!r}")
        if self.max_length < 3 and not self.packed:
            raise ValueError(f"max_length must be >= 3 (bos, one residue, eos), got {self.max_length}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")

    def example(self, item: np.ndarray, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, targets) of one item, unpadded."""
        rng = item_rng(self.seed, epoch, index)
        crop_rng = rng if self.train else None
        if self.objective == "uni":
            if self.packed:
                return uni_block(item, _TOK.bos_id)
            return uni_example(item, self.max_length, crop_rng, _TOK.bos_id, _TOK.eos_id)
        window = (
            item.astype(np.int64)
            if self.packed
            else bid_window(item, self.max_length, crop_rng, _TOK.bos_id, _TOK.eos_id)
        )
        return mask_tokens(window, rng, self.mask_prob, _TOK.mask_id, _TOK.n_special, self.replacement_ids)

    def __call__(self, items: Sequence[np.ndarray], indices: Sequence[int], epoch: int = 0) -> dict:
        if len(items) != len(indices):
            raise ValueError(f"{len(items)} items for {len(indices)} indices")
        pairs = [self.example(item, i, epoch) for item, i in zip(items, indices)]
        lengths = np.array([t.size for t, _ in pairs], dtype=np.int64)
        longest = int(lengths.max()) if lengths.size else 0
        length = max(longest, min(round_up(longest, self.pad_to_multiple_of), self.max_length))
        if self.packed:
            length = max(longest, round_up(longest, self.pad_to_multiple_of))
        tokens = pad_stack([t for t, _ in pairs], _TOK.pad_id, length)
        targets = pad_stack([y for _, y in pairs], IGNORE_INDEX, length)
        positions = torch.arange(length)
        lengths_t = torch.from_numpy(lengths)
        return {
            "tokens": tokens,
            "targets": targets,
            "key_padding_mask": positions[None, :] >= lengths_t[:, None],
            "index": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
            "lengths": lengths_t,
        }


def effective_lengths(residue_lengths: np.ndarray, objective: str, max_length: int, packed: bool) -> np.ndarray:
    """Unpadded batch length of each item, as :class:`Collator` will produce it."""
    if packed:
        return np.asarray(residue_lengths, dtype=np.int64)
    extra = Tokenizer.special_tokens(causal=objective == "uni")
    return np.minimum(np.asarray(residue_lengths, dtype=np.int64) + extra, max_length)
