"""Lightning DataModule over the sharded HDF5 store, with a seeded, DDP-aware batch sampler.

How a batch is made. :class:`BatchSampler` yields *batch keys* ``(epoch, indices)`` for this rank;
the DataLoader runs with ``batch_size=None``, so each worker receives one key, reads the items
(:class:`~protein_performer.data.shards.ShardedDataset` or
:class:`~protein_performer.data.shards.PackedDataset`, files opened lazily in the worker) and
collates them (:class:`~protein_performer.data.collate.Collator`). The batch format is documented
in :mod:`protein_performer.data.collate`.

DDP. :class:`BatchSampler` subclasses :class:`torch.utils.data.DistributedSampler`, so Lightning
keeps it (``use_distributed_sampler`` may stay True) and calls ``set_epoch`` every epoch. The
epoch's global order (a permutation seeded by ``[seed, epoch]``, the same on every rank) is cut so
that rank ``r`` of ``W`` takes every ``W``-th element: the ranks' parts are disjoint. With
``drop_last`` the tail that does not divide evenly is dropped (training); without, it is padded
with the order's first elements, as ``DistributedSampler`` does, so every rank runs the same
number of batches (evaluation; a few items are then seen twice).

Token budget. With ``max_tokens``, the epoch's order is cut into mega-batches of
``megabatch_size`` items, each sorted by length (longest first) and filled greedily into batches
whose padded size ``len(batch) * longest`` stays within ``max_tokens``; the batches are then
shuffled (seeded) and dealt to the ranks in turn, as above.

Resuming. Lightning restores the epoch counter, and batches depend on (seed, epoch, index) only,
so a resumed run repeats the interrupted epoch's order exactly; it restarts that epoch from its
first batch (the sampler is not resumed mid-epoch).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from protein_performer.errors import UserError

from .collate import Collator, effective_lengths
from .shards import PackedDataset, ShardedDataset, check_vocab, read_manifest
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class DataSetupError(UserError, ValueError):
    """The shard directory cannot feed this run (an empty split, too few items for one batch)."""


# ---------------------------------------------------------------------------------------- sampler
class BatchSampler(DistributedSampler):
    """Yields this rank's batch keys ``(epoch, indices)`` for one epoch (see the module docstring).

    Exactly one of ``batch_size`` and ``max_tokens`` sets the batch size; ``max_tokens`` needs
    ``lengths`` (each item's unpadded length). ``key_epoch`` fixes the epoch written into the keys
    (evaluation uses 0, so its masks never change); by default it is the sampler's epoch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        lengths: np.ndarray | None = None,
        max_tokens: int | None = None,
        pad_to_multiple_of: int = 1,
        megabatch_size: int = 4096,
        key_epoch: int | None = None,
    ):
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("give exactly one of batch_size and max_tokens")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.n = int(n)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.world_size = int(world_size)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.megabatch_size = int(megabatch_size)
        self.key_epoch = key_epoch
        self._cache: tuple[int, list[np.ndarray]] | None = None  # token-budget batches of one epoch
        if max_tokens is not None:
            if lengths is None or len(lengths) != n:
                raise ValueError("max_tokens needs the length of every item")
            self.lengths = np.asarray(lengths, dtype=np.int64)
            longest = int(self.lengths.max()) if n else 0
            if longest and self.padded(longest) > max_tokens:
                raise ValueError(
                    f"max_tokens={max_tokens} is smaller than the longest item ({longest} tokens, "
                    f"{self.padded(longest)} padded); raise max_tokens or lower max_length"
                )
        else:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self.lengths = None

    def padded(self, length: int) -> int:
        m = self.pad_to_multiple_of
        return -(-length // m) * m if m > 1 else length

    def _order(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return np.arange(self.n)

    def _deal(self, n_items: int, drop_last: bool) -> np.ndarray:
        """Positions ``0 .. n_items - 1`` that this rank takes: every ``world_size``-th from
        ``rank``, after dropping the tail (``drop_last``) or wrapping it around to the start."""
        w = self.world_size
        if n_items == 0:
            return np.zeros(0, dtype=np.int64)
        total = (n_items // w) * w if drop_last else math.ceil(n_items / w) * w
        return np.arange(self.rank, total, w, dtype=np.int64) % n_items

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, as index arrays."""
        order = self._order()
        if self.max_tokens is None:
            mine = order[self._deal(order.size, self.drop_last)]
            b = self.batch_size
            out = [mine[i : i + b] for i in range(0, mine.size, b)]
            if self.drop_last and out and out[-1].size < b:
                out.pop()
            return out
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        out: list[np.ndarray] = []
        for m in range(0, order.size, self.megabatch_size):
            mega = order[m : m + self.megabatch_size]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            start = 0
            while start < mega.size:
                longest = self.padded(int(self.lengths[mega[start]]))
                count = max(1, self.max_tokens // longest) if longest else mega.size - start
                out.append(mega[start : start + count])
                start += count
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(out))
            out = [out[i] for i in perm]
        self._cache = (self.epoch, [out[i] for i in self._deal(len(out), self.drop_last)])
        return self._cache[1]

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch = self.epoch if self.key_epoch is None else self.key_epoch
        for b in self.batches():
            yield epoch, b.tolist()

    def __len__(self) -> int:
        if self.max_tokens is None:
            w, b = self.world_size, self.batch_size
            per_rank = self.n // w if self.drop_last else math.ceil(self.n / w)
            return per_rank // b if self.drop_last else math.ceil(per_rank / b)
        return len(self.batches())


class CollatedDataset(torch.utils.data.Dataset):
    """Map-style dataset whose keys are batch keys ``(epoch, indices)`` and values whole batches."""

    def __init__(self, source: ShardedDataset | PackedDataset, collator: Collator):
        self.source = source
        self.collator = collator

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, Sequence[int]]) -> dict:
        epoch, indices = key
        return self.collator([self.source[i] for i in indices], indices, epoch)


def _as_batch(batch: dict) -> dict:
    """collate_fn for ``batch_size=None``: the worker already built the batch."""
    return batch


# ---------------------------------------------------------------------------------------- module
class ProteinDataModule(pl.LightningDataModule):
    """Train / valid / test / ood loaders over ``root`` (the ingestion ``output_dir``).

    ``objective``: ``"uni"`` or ``"bid"``. ``batch_size`` items per batch, or ``token_budget``
    padded tokens per batch (length-bucketed, see :class:`BatchSampler`). ``packing``: TrEMBL-concat
    blocks of ``block_size`` tokens instead of single cropped sequences. ``eval_splits`` present and
    non-empty in the manifest are used: validation runs on valid and ood, test on test and ood;
    ``val_split_names`` / ``test_split_names`` give the name of each ``dataloader_idx``.
    """

    def __init__(
        self,
        root: str,
        objective: str = "bid",
        batch_size: int = 32,
        max_length: int = 1024,
        mask_prob: float = 0.15,
        packing: bool = False,
        block_size: int = 8192,
        token_budget: int | None = None,
        pad_to_multiple_of: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        eval_splits: Sequence[str] = ("valid", "test", "ood"),
        eval_batch_size: int | None = None,
        megabatch_size: int = 4096,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ):
        super().__init__()
        if objective not in ("uni", "bid"):
            raise ValueError(f"objective must be 'uni' or 'bid', got {objective!r}")
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.objective = objective
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.max_length = int(block_size if packing else max_length)
        self.mask_prob = float(mask_prob)
        self.packing = bool(packing)
        self.block_size = int(block_size)
        self.token_budget = None if token_budget in (None, 0) else int(token_budget)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.eval_splits = tuple(eval_splits)
        unknown = [s for s in self.eval_splits if s not in ("valid", "test", "ood")]
        if unknown:
            raise DataSetupError(f"data.eval_splits: unknown split(s) {unknown}; choose among valid, test, ood")
        self.megabatch_size = int(megabatch_size)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.tokenizer = Tokenizer()
        self.datasets: dict[str, ShardedDataset | PackedDataset] = {}
        self.manifest: dict | None = None
        self._frequencies: dict[tuple[str, bool], np.ndarray] = {}
        self._skipped: set[str] = set()

    # -------------------------------------------------------------- set-up
    def _available(self, split: str) -> bool:
        entry = self.manifest["splits"].get(split)
        return bool(entry) and int(entry.get("n_sequences", 0)) > 0 and bool(entry.get("shards"))

    def _dataset(self, split: str) -> ShardedDataset | PackedDataset:
        if split not in self.datasets:
            seqs = ShardedDataset(self.root, split, manifest=self.manifest)
            self.datasets[split] = PackedDataset(seqs, self.block_size, self.tokenizer.eos_id) if self.packing else seqs
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Open the splits that ``stage`` needs. An empty or missing eval split is skipped with a
        log line; when ``stage`` is ``"validate"`` or ``"test"`` (``trainer.validate`` /
        ``trainer.test``) and none of its splits is there, a warning says what to do (the run goes
        on: a small store may have no test split). A split asked for by name
        (:class:`ShardedDataset`, :meth:`residue_frequencies`) that is missing raises
        :class:`MissingSplitError`."""
        self._setup(stage)
        if stage in ("validate", "test"):
            names = self.val_split_names if stage == "validate" else self.test_split_names
            if not names:
                wanted = [
                    s for s in (("valid", "ood") if stage == "validate" else ("test", "ood")) if s in self.eval_splits
                ]
                present = [s for s in self.manifest["splits"] if self._available(s)]
                log.warning(
                    "%s/manifest.json: nothing to %s on: no %s split with sequences (present: %s); ingest with "
                    "fractions giving it a share, or set data.eval_splits to a present split",
                    self.root,
                    stage,
                    " or ".join(map(repr, wanted)) or "eval",
                    ", ".join(present) or "none",
                )

    def _setup(self, stage: str | None = None) -> None:
        if self.manifest is None:
            manifest = read_manifest(self.root)
            check_vocab(self.root, manifest, self.tokenizer.vocab())
            self.manifest = manifest
        wanted = []
        if stage in (None, "fit"):
            wanted.append("train")
        if stage in (None, "fit", "validate"):
            wanted += [s for s in ("valid", "ood") if s in self.eval_splits]
        if stage in (None, "test"):
            wanted += [s for s in ("test", "ood") if s in self.eval_splits]
        for split in dict.fromkeys(wanted):
            if self._available(split):
                self._dataset(split)
            elif split == "train":
                raise DataSetupError(
                    f"{self.root}/manifest.json: the train split is empty or missing; ingest with a non-zero "
                    "fractions.train (and check rejects.tsv: were the records rejected?)"
                )
            elif split not in self._skipped:
                self._skipped.add(split)
                log.info("%s: split %r is empty or missing; no loader for it", self.root, split)

    @property
    def val_split_names(self) -> list[str]:
        return [s for s in ("valid", "ood") if s in self.eval_splits and s in self.datasets]

    @property
    def test_split_names(self) -> list[str]:
        return [s for s in ("test", "ood") if s in self.eval_splits and s in self.datasets]

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -------------------------------------------------------------- loaders
    def collator(self, train: bool) -> Collator:
        return Collator(
            objective=self.objective,
            max_length=self.max_length,
            mask_prob=self.mask_prob,
            train=train,
            seed=self.seed,
            packed=self.packing,
            pad_to_multiple_of=self.pad_to_multiple_of,
            replacement_ids=self.tokenizer.residue_ids.copy(),
        )

    def sampler(self, split: str, train: bool) -> BatchSampler:
        ds = self._dataset(split)
        rank, world = self._rank_world()
        lengths = None
        if self.token_budget is not None:
            lengths = effective_lengths(ds.lengths(), self.objective, self.max_length, self.packing)
        sampler = BatchSampler(
            len(ds),
            batch_size=None if self.token_budget else (self.batch_size if train else self.eval_batch_size),
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            drop_last=train,
            lengths=lengths,
            max_tokens=self.token_budget,
            pad_to_multiple_of=self.pad_to_multiple_of,
            megabatch_size=self.megabatch_size,
            key_epoch=None if train else 0,
        )
        trainer = self.trainer
        if train and trainer is not None:
            sampler.set_epoch(int(trainer.current_epoch))
        return sampler

    def loader(self, split: str, train: bool) -> DataLoader:
        ds = self._dataset(split)
        ds.close()  # never hand an open HDF5 file to a forked worker
        kwargs = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return DataLoader(
            CollatedDataset(ds, self.collator(train)),
            batch_size=None,
            sampler=self.sampler(split, train),
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self._setup("fit")  # idempotent: datasets are built once
        loader = self.loader("train", train=True)
        if len(loader.sampler) == 0:
            _, world = self._rank_world()
            raise DataSetupError(
                f"{self.root}: the train split ({len(self.datasets['train'])} items over {world} ranks) "
                f"does not fill one batch of {self.batch_size}; lower data.batch_size"
            )
        return loader

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per name in :attr:`val_split_names` (valid, then ood), in that order."""
        self._setup("validate")  # (during fit: no validation split is not an error)
        return [self.loader(s, train=False) for s in self.val_split_names]

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per name in :attr:`test_split_names` (test, then ood), in that order."""
        self._setup("test")
        return [self.loader(s, train=False) for s in self.test_split_names]

    # -------------------------------------------------------------- statistics
    def residue_frequencies(self, split: str = "train", include_eos: bool = False) -> np.ndarray:
        """Relative frequency of every token id (float64 [vocab_size], sums to 1) over the split's
        residues, read from the shards in chunks: the unigram baseline. With ``include_eos`` one
        eos per sequence is counted too (the UNI targets' distribution, uncropped)."""
        key = (split, include_eos)
        if key not in self._frequencies:
            if self.manifest is None:
                manifest = read_manifest(self.root)
                check_vocab(self.root, manifest, self.tokenizer.vocab())
                self.manifest = manifest
            seqs = ShardedDataset(self.root, split, manifest=self.manifest)
            counts = seqs.residue_counts(self.tokenizer.vocab_size).astype(np.float64)
            seqs.close()
            if include_eos:
                counts[self.tokenizer.eos_id] += len(seqs)
            total = counts.sum()
            if total == 0:
                raise DataSetupError(f"{self.root}: split {split!r} has no residues; ingest data with sequences in it")
            self._frequencies[key] = counts / total
        return self._frequencies[key]
