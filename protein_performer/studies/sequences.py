"""The studies' data: real protein sequences as token ids, seeded splits, and batches.

The embedded Swiss-Prot sample (``swissprot_sample.fasta.gz``, 1,000 real sequences; it ships in the
package, see :mod:`protein_performer.resources`) is the default; ``load_sequences`` reads any
FASTA(.gz) through the project's streaming reader and tokenizer, and counts (never silently drops)
records with residues outside the alphabet. Batches come from the project's ``Collator`` (UNI
next-token / BID masked LM), so the studies train on exactly what ``protein_performer.train`` would feed.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from protein_performer.data.collate import Collator
from protein_performer.data.fasta import read_fasta
from protein_performer.data.tokenizer import Tokenizer, UnknownResidueError
from protein_performer.resources import SAMPLE_DATA
from protein_performer.training.utils import stable_seed

log = logging.getLogger(__name__)

# the embedded sample (read only: the studies write to their --out-dir, never here)
SAMPLE = SAMPLE_DATA / "swissprot_sample.fasta.gz"
VALID_FRACTION = 0.1  # the studies' train / valid split


def load_sequences(path: str | os.PathLike = SAMPLE, max_records: int | None = None) -> tuple[list[np.ndarray], dict]:
    """Token ids (uint8 residues, no special tokens) of the records of a FASTA(.gz) file.

    Returns the sequences and counts ``{"read", "kept", "rejected_unknown_residue", "empty"}``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such FASTA file (the embedded sample is {SAMPLE})")
    tok = Tokenizer()
    seqs, counts = [], {"read": 0, "kept": 0, "rejected_unknown_residue": 0, "empty": 0}
    for rec in read_fasta(path):
        counts["read"] += 1
        if not rec.sequence:
            counts["empty"] += 1
            continue
        try:
            seqs.append(tok.encode_bytes(rec.sequence))
        except UnknownResidueError as e:
            counts["rejected_unknown_residue"] += 1
            log.warning("%s line %d: %s; record skipped", path, rec.line, e)
            continue
        counts["kept"] += 1
        if max_records is not None and counts["kept"] >= max_records:
            break
    if not seqs:
        raise ValueError(f"{path}: no usable sequence ({counts})")
    log.info("read %s: %s", path, counts)
    return seqs, counts


def split_sequences(
    seqs: list[np.ndarray], valid_fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A seeded random train / valid split (valid gets ``ceil(valid_fraction * n)`` sequences)."""
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_valid = max(1, math.ceil(valid_fraction * len(seqs)))
    return [seqs[i] for i in order[n_valid:]], [seqs[i] for i in order[:n_valid]]


def load_split(path: str | os.PathLike, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """The studies' data: the sequences of a FASTA(.gz) split 90/10 into train and valid by ``seed``
    (the split ``pretrained`` trains on), and ``load_sequences``' counts."""
    seqs, counts = load_sequences(path)
    train_seqs, valid_seqs = split_sequences(seqs, VALID_FRACTION, seed)
    return train_seqs, valid_seqs, counts


def train_batch(collator: Collator, seqs: list[np.ndarray], batch_size: int, step: int, seed: int) -> dict:
    """The training batch of step ``step``: indices and crops/masks depend on (seed, step) only."""
    rng = np.random.default_rng(stable_seed(seed, "batch", step))
    idx = rng.integers(0, len(seqs), size=batch_size)
    return collator([seqs[i] for i in idx], [int(i) for i in idx], epoch=step)


def eval_batches(seqs: list[np.ndarray], objective: str, max_length: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Fixed evaluation batches (crop at the start, masks fixed by ``seed``): the same every call."""
    collator = Collator(objective=objective, max_length=max_length, train=False, seed=seed)
    return [
        collator(seqs[i : i + batch_size], list(range(i, min(i + batch_size, len(seqs)))), epoch=0)
        for i in range(0, len(seqs), batch_size)
    ]


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch with its tensors on ``device`` (other entries as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
