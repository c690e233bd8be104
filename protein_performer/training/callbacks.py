"""Training callbacks: random-feature redraw, throughput, end-of-training checkpoint, data audit,
per-step loss log.

``FeatureRedraw`` is the only one that changes training: at every global step ``s`` with
``s % redraw_interval == 0`` (step 0 included), before the forward pass, layer ``i`` redraws its
random features from ``stable_seed(seed, "features", s, i)``. Every rank computes the same seed
without communicating, so the features stay identical across ranks; a resumed run restores the
features from the checkpoint's buffers and redraws at the same steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from protein_performer.training.checkpoint_io import atomic_link, remove_stale_temporaries
from protein_performer.training.utils import stable_seed, tensor_digest

log = logging.getLogger(__name__)


def feature_seed(seed: int, step: int, layer: int) -> int:
    """Seed of layer ``layer``'s random features drawn at global step ``step``."""
    return stable_seed(seed, "features", step, layer)


def redraw_model_features(model: torch.nn.Module, seed: int, step: int) -> None:
    """Redraw all layers of ``model`` (a PerformerLM, or a module holding one as ``.model``)."""
    lm = model.model if hasattr(model, "model") and hasattr(model.model, "redraw_features") else model
    lm.redraw_features(lambda layer: feature_seed(seed, step, layer))


class FeatureRedraw(Callback):
    """Redraw every attention layer's random features each ``redraw_interval`` steps (0 = never)."""

    def __init__(self, redraw_interval: int = 1000, seed: int = 0):
        if redraw_interval < 0:
            raise ValueError(f"redraw_interval must be >= 0, got {redraw_interval}")
        self.redraw_interval = redraw_interval
        self.seed = seed
        self.last_redraw_step: int | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.redraw_interval and step % self.redraw_interval == 0 and step != self.last_redraw_step:
            redraw_model_features(pl_module, self.seed, step)
            self.last_redraw_step = step
            log.debug("redrew random features at step %d", step)

    def state_dict(self) -> dict[str, Any]:
        return {"redraw_interval": self.redraw_interval, "seed": self.seed, "last_redraw_step": self.last_redraw_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_redraw_step = state_dict.get("last_redraw_step")


class Throughput(Callback):
    """Logs ``train/tokens_per_s`` (non-padding tokens, all ranks) and ``train/sequences_per_s``.

    Rates are measured over windows of ``window`` steps between the ends of consecutive training
    batches (data loading included); counts are summed over ranks at the end of each window.
    """

    def __init__(self, window: int = 10):
        self.window = max(1, int(window))
        self._t0: float | None = None
        self._tokens = 0
        self._padded = 0
        self._seqs = 0
        self._steps = 0
        self.last: dict[str, float] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._tokens, self._padded, self._seqs, self._steps = time.perf_counter(), 0, 0, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        mask = batch["key_padding_mask"]
        self._tokens += int((~mask).sum())
        self._padded += mask.numel()
        self._seqs += int(mask.shape[0])
        self._steps += 1
        if self._steps < self.window:
            return
        elapsed = time.perf_counter() - self._t0
        counts = torch.tensor([self._tokens, self._padded, self._seqs], dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.last = {
            "train/tokens_per_s": float(counts[0]) / elapsed,
            "train/padded_tokens_per_s": float(counts[1]) / elapsed,
            "train/sequences_per_s": float(counts[2]) / elapsed,
        }
        for k, v in self.last.items():
            pl_module.log(k, v, on_step=True, on_epoch=False, sync_dist=False)
        self._t0, self._tokens, self._padded, self._seqs, self._steps = time.perf_counter(), 0, 0, 0, 0


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes a checkpoint (and ``last.ckpt``) when training ends,
    also when it ends between two ``every_n_train_steps`` saves (``max_steps``, ``max_time``).

    Crash safety: the files themselves are written atomically by the trainer's
    :class:`~protein_performer.training.checkpoint_io.AtomicCheckpointIO` (``train()`` installs
    it); ``save_last="link"`` replaces ``last.ckpt`` by an atomic rename of a new link (Lightning
    deletes the old one first, so a kill in between left no ``last.ckpt``); temporary files left
    by a killed run are removed when the next one starts.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            remove_stale_temporaries(self.dirpath)

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                raise IsADirectoryError(21, "a folder is in the way of the last checkpoint link", linkpath)
            atomic_link(filepath, linkpath)
        trainer.strategy.barrier()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None:
                self._save_none_monitor_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class DataAudit(Callback):
    """Writes ``<output_dir>/rank<r>.json``: the dataset indices of every training batch this rank
    saw, and at the end of fit a digest of every parameter and buffer. Used to check DDP runs
    (disjoint data, identical weights and random features) and resume order."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "index": batch["index"].tolist()}
        )

    def on_train_end(self, trainer, pl_module) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {k: tensor_digest(v) for k, v in pl_module.state_dict().items()}
        out = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "steps": self.steps,
            "state": state,
        }
        path = self.output_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(out))
        log.info("data audit written to %s", path)


class LossLog(Callback):
    """Appends ``<global step> <training loss>`` (the loss of the batch trained at that step, as
    ``repr(float)``, exact) to ``path`` after every training batch, flushed at once, so the
    lines survive a killed process. A resumed run appends to the same file: the steps it replays
    after its checkpoint appear twice, and must carry the same loss."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._fh = None
        self._step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._fh is None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._fh.write(f"{self._step} {float(loss)!r}\n")
        self._fh.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
