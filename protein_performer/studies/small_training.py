"""The studies' small seeded training loop, model construction and evaluation.

Training here is a plain PyTorch loop (AdamW with the paper's betas and eps, linear warmup then
cosine decay to 10%, gradient clipping), not the Lightning module: the studies train for a few
hundred steps and need the model between steps (feature redraw, weight swap, evaluation curves)
more than checkpointing or DDP. Every random draw (batches, crops, masks, dropout) depends on
(seed, step) only, so two runs with the same config give the same losses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from protein_performer.data.collate import IGNORE_INDEX, Collator
from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.studies.sequences import to_device, train_batch
from protein_performer.training.utils import stable_seed

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.98)  # the paper's
ADAM_EPS = 1e-9
FINAL_LR_FRACTION = 0.1  # cosine decay ends at 10% of the peak learning rate


@dataclass
class TrainConfig:
    objective: str = "bid"
    max_length: int = 256
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    clip: float = 0.5
    seed: int = 0


def build_model(attention: str, causal: bool, seed: int, **kw) -> PerformerLM:
    """A PerformerLM with its weights drawn from ``seed`` (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PerformerLM(PerformerConfig(attention=attention, causal=causal, **kw))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu") -> dict[str, float]:
    """Token-weighted loss, accuracy and perplexity over the non-ignored targets of ``batches``."""
    was_training = model.training
    model.eval()
    nll = correct = n = 0.0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])["logits"].float()
        flat_logits, flat = logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1)
        keep = flat != IGNORE_INDEX
        nll += float(F.cross_entropy(flat_logits, flat, ignore_index=IGNORE_INDEX, reduction="sum"))
        correct += float(((flat_logits.argmax(-1) == flat) & keep).sum())
        n += float(keep.sum())
    model.train(was_training)
    loss = nll / max(n, 1.0)
    return {"loss": loss, "acc": correct / max(n, 1.0), "ppl": math.exp(loss), "targets": n}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` over ``cfg.lr``: linear warmup, then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit_small_model(
    model: torch.nn.Module,
    seqs: list[np.ndarray],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    eval_every: int = 0,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` steps on random crops of ``seqs``.

    AdamW (betas 0.9/0.98, eps 1e-9, the paper's), linear warmup then cosine decay to 10%,
    gradient-norm clipping ``cfg.clip``. ``on_step(step, model)`` runs before each step's forward
    (feature redraw goes there). Every ``eval_every`` steps (and after the last) ``eval_fn(model)``
    is recorded. Dropout draws come from a generator seeded by (seed, step). Returns the history:
    ``[{"step", "train_loss", ...eval metrics}]`` (train loss every step, eval where run).
    """
    from tqdm.auto import tqdm

    model.to(device).train()
    collator = Collator(objective=cfg.objective, max_length=cfg.max_length, train=True, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    evaluating = eval_fn is not None and eval_every
    history: list[dict] = [{"step": 0, **eval_fn(model)}] if evaluating else []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if on_step is not None:
            on_step(step, model)
        batch = to_device(train_batch(collator, seqs, cfg.batch_size, step, cfg.seed), device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(cfg.seed, "dropout", step))
            logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])["logits"]
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), ignore_index=IGNORE_INDEX
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        row = {"step": step + 1, "train_loss": float(loss.detach())}
        if evaluating and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
            row.update(eval_fn(model))
            model.train()
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}")
    model.eval()
    return history
