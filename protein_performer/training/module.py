"""The LightningModule: UNI / BID losses, exactly aggregated metrics, the unigram baseline, AdamW.

Losses. The DataModule's collation already aligns ``targets`` with ``tokens`` (UNI: the next
token; BID: the original residue at masked positions; ``-100`` elsewhere), so both objectives are
one cross-entropy over the non-ignored targets; only the model's ``causal`` flag differs.

Metrics per evaluation split (``valid``, ``test``, ``ood``): the sums ``NLL``, ``correct`` and
``n`` of the non-ignored targets are accumulated over batches, summed over ranks, and only then
divided: ``loss = NLL / n``, ``acc = correct / n``, ``ppl = exp(loss)`` (a token-weighted mean,
never a mean of per-batch means). The same pass counts the targets' histogram ``q`` for the
empirical unigram baseline of the paper's table: with ``p`` the training split's token
frequencies over the ids a target can take (the residues, plus eos for UNI; every frequency
floored at 1e-6 so a residue absent from training has a finite cost), the baseline predicts
``argmax p`` everywhere, so ``unigram_acc = q(argmax p) / n`` and
``unigram_ppl = exp(-sum_t q(t) log p(t) / n)``. It is logged once per split.

Optimizer: the paper's Adam (0.9, 0.98, eps 1e-9), lr 1e-3, weight decay 0.1. The released JAX
code (flax ``optim.Adam(weight_decay=...)``) decays decoupled from the gradient, scaled by the
learning rate, which is ``torch.optim.AdamW``; by default every parameter decays as there
(``decay_filter="all"``), ``decay_filter="matrices"`` spares biases, norms and embeddings.
The optimizer step uses PyTorch's fused AdamW kernel when the parameters allow it (``fused``).
Schedule: linear warmup over ``warmup_steps`` then ``constant``, ``linear`` or ``cosine`` decay
to ``min_lr_ratio * lr`` at ``total_steps`` (default: the trainer's ``max_steps``).

Dropout randomness: each training step runs under a forked RNG seeded with
``stable_seed(seed, "dropout", global_step, rank)``, so a resumed run draws the same dropout
masks as an uninterrupted one, and the global RNG is left to the rest of the program.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.training.utils import OBJECTIVES, stable_seed

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SCHEDULES = ("constant", "linear", "cosine")


def lr_lambda(step: int, warmup_steps: int, schedule: str, total_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def unigram_baseline(train_freq: torch.Tensor, target_hist: torch.Tensor, objective: str) -> dict[str, float]:
    """Accuracy and perplexity of the empirical unigram model on targets with histogram ``target_hist``.

    ``p`` = training frequencies (counts or relative) restricted to the ids a target can take
    (the residues, plus eos for UNI), floored at 1e-6 and renormalised; the prediction is ``argmax p``.
    """
    tok = Tokenizer()
    support = torch.zeros_like(train_freq, dtype=torch.bool)
    support[tok.n_special :] = True
    if objective == "uni":
        support[tok.eos_id] = True
    f = train_freq.double() / train_freq.double().sum()
    p = torch.where(support, f.clamp_min(1e-6), torch.zeros_like(f))
    p = p / p.sum()
    q = target_hist.double()
    n = q.sum()
    if n == 0:
        return {"unigram_acc": float("nan"), "unigram_ppl": float("nan")}
    if (q[~support] > 0).any():
        raise ValueError(
            f"targets hold ids outside the unigram support: {torch.nonzero(q * ~support).flatten().tolist()}"
        )
    logp = torch.where(support, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return {
        "unigram_acc": float(q[int(p.argmax())] / n),
        "unigram_ppl": float(torch.exp(-(q * logp).sum() / n)),
    }


class ProteinLM(pl.LightningModule):
    """Trains a :class:`PerformerLM` (passed built, as its :class:`PerformerConfig`, or as that config's
    fields: what a checkpoint's ``hyper_parameters["model"]`` holds) on UNI or BID."""

    def __init__(
        self,
        model: nn.Module | PerformerConfig | dict,
        objective: str = "bid",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-9,
        weight_decay: float = 0.1,
        decay_filter: str = "all",
        warmup_steps: int = 0,
        schedule: str = "constant",
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        seed: int = 0,
        fused: bool | None = None,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if decay_filter not in ("all", "matrices"):
            raise ValueError(f"decay_filter must be 'all' or 'matrices', got {decay_filter!r}")
        if isinstance(model, nn.Module):
            model_config = asdict(model.config) if isinstance(getattr(model, "config", None), PerformerConfig) else None
        else:
            model = PerformerLM(model if isinstance(model, PerformerConfig) else PerformerConfig(**model))
            model_config = asdict(model.config)
        causal = getattr(getattr(model, "config", None), "causal", None)
        if causal is not None and causal != (objective == "uni"):
            raise ValueError(
                f"objective {objective!r} needs causal={objective == 'uni'} attention, but the model has causal={causal}; "
                "set model.causal from the objective (the configs do: causal: ${pp.causal:${objective}})"
            )
        self.model = model
        self.save_hyperparameters(
            {
                "model": model_config,
                "objective": objective,
                "lr": lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "decay_filter": decay_filter,
                "warmup_steps": warmup_steps,
                "schedule": schedule,
                "total_steps": total_steps,
                "min_lr_ratio": min_lr_ratio,
                "seed": seed,
                "fused": fused,
            }
        )
        self.objective = objective
        self.seed = seed
        self.train_counts: torch.Tensor | None = None  # training-split token counts (unigram baseline)
        self.baselines: dict[str, dict[str, float]] = {}
        self._eval: dict[str, torch.Tensor] = {}
        self.eval_results: dict[str, float] = {}

    # ---------------------------------------------------------------- forward / loss
    def forward(self, tokens, key_padding_mask=None, return_attention=False):
        return self.model(tokens, key_padding_mask=key_padding_mask, return_attention=return_attention)

    def _sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(NLL sum, correct, n, targets) over the non-ignored targets of ``batch``."""
        logits = self.model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])["logits"]
        targets = batch["targets"]
        logits = logits.float().reshape(-1, logits.shape[-1])
        flat = targets.reshape(-1)
        keep = flat != IGNORE_INDEX
        nll = F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.argmax(-1) == flat) & keep).sum()
        return nll, correct, keep.sum(), flat[keep]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rank = self.global_rank
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(stable_seed(self.seed, "dropout", self.global_step, rank))
            nll, correct, n, _ = self._sums(batch)
        n_f = n.clamp_min(1).float()
        loss = nll / n_f
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", correct.float() / n_f)
        self.log("train/ppl", torch.exp(loss.detach()))
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    # ---------------------------------------------------------------- evaluation
    def _split_names(self, stage: str) -> list[str]:
        trainer = self.trainer
        n = len(trainer.num_val_batches if stage == "val" else trainer.num_test_batches)
        dm = trainer.datamodule
        names = None
        if dm is not None:
            fn = getattr(dm, "val_split_names" if stage == "val" else "test_split_names", None)
            names = list(fn() if callable(fn) else fn) if fn is not None else None
        if names is None:
            names = (["valid", "ood"] if stage == "val" else ["test", "ood"])[:n]
        if len(names) != n:
            raise RuntimeError(f"{n} {stage} dataloaders but split names {names}")
        return names

    def _eval_start(self) -> None:
        self._eval = {}

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        nll, correct, n, targets = self._sums(batch)
        vocab = self.model.lm_head.out_features if hasattr(self.model, "lm_head") else int(targets.max()) + 1
        hist = torch.bincount(targets, minlength=vocab).double()
        acc = self._eval.get(dataloader_idx)
        row = torch.cat([torch.stack([nll.double(), correct.double(), n.double()]), hist])
        self._eval[dataloader_idx] = row if acc is None else acc + row

    def _eval_end(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        names = self._split_names(stage)
        vocab = self.model.lm_head.out_features
        for idx, split in enumerate(names):
            row = self._eval.get(idx, torch.zeros(3 + vocab, dtype=torch.float64, device=self.device))
            row = self.trainer.strategy.reduce(row.clone(), reduce_op="sum")  # every rank holds every split
            nll, correct, n, hist = row[0], row[1], row[2], row[3:]
            n_f = float(n)
            metrics = {
                f"{split}/loss": float(nll / n) if n_f else float("nan"),
                f"{split}/acc": float(correct / n) if n_f else float("nan"),
                f"{split}/ppl": math.exp(float(nll / n)) if n_f else float("nan"),
                f"{split}/targets": n_f,
            }
            if self.train_counts is not None and split not in self.baselines and n_f:
                self.baselines[split] = unigram_baseline(self.train_counts.cpu(), hist.cpu(), self.objective)
                log.info("unigram baseline on %s: %s", split, self.baselines[split])
                for k, v in self.baselines[split].items():
                    metrics[f"{split}/{k}"] = v  # logged once per split
            for k, v in metrics.items():
                self.log(k, v, sync_dist=False, add_dataloader_idx=False)
            self.eval_results.update(metrics)
            for k, v in self.baselines.get(split, {}).items():
                self.eval_results[f"{split}/{k}"] = v
        self._eval = {}

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ---------------------------------------------------------------- setup / checkpoint
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.train_counts is None and dm is not None and hasattr(dm, "residue_frequencies"):
            freq = dm.residue_frequencies("train", include_eos=self.objective == "uni")
            self.train_counts = torch.as_tensor(freq, dtype=torch.float64)
            log.info("unigram baseline from the training split's token frequencies")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.train_counts is not None:
            checkpoint["unigram_train_counts"] = self.train_counts.tolist()
        checkpoint["unigram_baselines"] = self.baselines

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "unigram_train_counts" in checkpoint:
            self.train_counts = torch.tensor(checkpoint["unigram_train_counts"], dtype=torch.float64)
        self.baselines = dict(checkpoint.get("unigram_baselines", {}))

    # ---------------------------------------------------------------- optimisation
    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.detach().float().norm(2) for p in self.parameters() if p.grad is not None]
        if grads:  # before clipping (Lightning clips after this hook)
            self.log("train/grad_norm", torch.stack(grads).norm(2))

    def configure_optimizers(self):
        h = self.hparams
        decay, no_decay, seen = [], [], set()
        for name, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            spare = h.decay_filter == "matrices" and (p.ndim < 2 or "emb" in name)
            (no_decay if spare else decay).append(p)
        groups = [{"params": decay, "weight_decay": h.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        kwargs = dict(lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        fused = h.get("fused")
        if fused is None:
            # the fused kernel (CPU and CUDA) is ~10x faster than the per-tensor loop on CPU; Lightning's
            # mixed-precision plugin cannot clip gradients with it, so not under *-mixed precision
            mixed = self._trainer is not None and "mixed" in str(self.trainer.precision)
            fused = not mixed and all(
                p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"]
            )
        optimizer = torch.optim.AdamW(groups, fused=bool(fused), **kwargs)
        total = h.total_steps
        if total is None and h.schedule != "constant":
            est = self.trainer.max_steps
            if est is None or est < 0:
                raise ValueError(f"schedule {h.schedule!r} needs total_steps or trainer.max_steps")
            total = est
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, h.warmup_steps, h.schedule, total, h.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
