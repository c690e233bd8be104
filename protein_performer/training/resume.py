"""Mid-epoch resume: a training DataLoader wrapper that Lightning saves and restores.

Lightning (2.3+) stores the ``state_dict()`` of every training loader that has ``state_dict`` and
``load_state_dict`` in the checkpoint and hands it back on ``ckpt_path=...``. Our batches depend on
(seed, epoch, position in the epoch's order) only (``protein_performer.data``), so the state is just
(epoch, batches already trained on in it): a resumed run rebuilds the epoch's order and starts after
those batches, skipping them at the sampler (keys only, nothing read from disk), instead of
replaying the epoch from its first batch.

:class:`EpochProgressRepair` works around a Lightning (2.6) bookkeeping slip that a chain of
resumes exposes; ``train()`` always adds it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class ResumableLoader:
    """Wraps a ``DataLoader``; everything but iteration and state is delegated to it."""

    def __init__(self, loader: DataLoader, trainer):
        self.loader = loader
        self._trainer = trainer
        self._resume: dict[str, int] | None = None

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, dataset, num_workers, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def _epoch(self) -> int:
        """The epoch the sampler is set to (Lightning sets it at each epoch start)."""
        epoch = getattr(getattr(self.loader, "sampler", None), "epoch", None)
        return int(self._trainer.current_epoch if epoch is None else epoch)

    def state_dict(self) -> dict[str, int]:
        progress = self._trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self._epoch(), "batches": int(progress.processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self) -> Iterator:
        resume, self._resume = self._resume, None
        return self._iterate(resume)

    def _iterate(self, resume: dict[str, int] | None) -> Iterator:
        # a generator: nothing runs until the first batch is asked for, after Lightning has set the
        # sampler's epoch (on resume it creates the iterator before that)
        skip = 0
        if resume is not None and resume["epoch"] == self._epoch():
            skip = min(resume["batches"], len(self.loader))
        if skip:
            log.info("resuming epoch %d after its first %d batches", resume["epoch"], skip)
            yield from self._skipping(skip)
        else:
            yield from self.loader

    def _skipping(self, skip: int) -> DataLoader:
        """The same loader over the epoch's sampler keys (or index batches) from ``skip`` on."""
        dl = self.loader
        common = dict(
            num_workers=dl.num_workers,
            collate_fn=dl.collate_fn,
            pin_memory=dl.pin_memory,
            worker_init_fn=dl.worker_init_fn,
            timeout=dl.timeout,
            multiprocessing_context=dl.multiprocessing_context,
        )
        if dl.num_workers > 0:
            common["prefetch_factor"] = dl.prefetch_factor
        if dl.batch_size is None:  # the sampler yields whole-batch keys
            keys = list(iter(dl.sampler))[skip:]
            return DataLoader(dl.dataset, batch_size=None, sampler=keys, **common)
        batches = list(iter(dl.batch_sampler))[skip:]
        return DataLoader(dl.dataset, batch_sampler=batches, **common)


def make_resumable(datamodule, trainer) -> None:
    """Make ``datamodule.train_dataloader()`` return :class:`ResumableLoader` (idempotent)."""
    if getattr(datamodule, "_pp_resumable", False):
        return
    original = datamodule.train_dataloader

    def train_dataloader():
        loader = original()
        return loader if isinstance(loader, ResumableLoader) else ResumableLoader(loader, trainer)

    datamodule.train_dataloader = train_dataloader
    datamodule._pp_resumable = True


class EpochProgressRepair(Callback):
    """Counts the running epoch as started when Lightning forgot to.

    Resumed from a checkpoint written at the last batch of an epoch, Lightning's fit loop finishes
    that epoch and begins the next one without counting it as ready/started (and without calling
    ``on_train_epoch_start``). Every checkpoint written during that epoch then says it has not
    begun, and a run resumed from one of those restarts the epoch's count wrongly and trains on
    other batches than an uninterrupted run (the SIGKILL test in ``tests/reliability/test_crash_train.py``
    found it: kill, resume at an epoch end, kill again, resume). During a training batch the
    running epoch is always started and not yet processed, so ``started == processed`` can only be
    that slip; counting the epoch restores what an uninterrupted run has at that point.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        progress = trainer.fit_loop.epoch_progress
        if progress.current.started == progress.current.processed:
            progress.increment_ready()
            progress.increment_started()
            log.debug("epoch %d counted as started (Lightning resume bookkeeping)", progress.current.processed)
