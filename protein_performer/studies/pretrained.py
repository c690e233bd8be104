"""Trained models the studies share, cached on disk, and a probe of their queries and keys.

``pretrained`` trains a model with :func:`~protein_performer.studies.small_training.fit_small_model`
once and caches its weights under a hash of everything that determines them; studies 1 and 3 use
the same exact-softmax BID Transformer (``exact_reference``, head dim 16 as in the paper's
approximation study). The cache lives in ``$XDG_CACHE_HOME/protein_performer/studies``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from protein_performer.model.performer import PerformerLM
from protein_performer.outputs import atomic_output
from protein_performer.studies.sequences import SAMPLE, eval_batches, load_split
from protein_performer.studies.small_training import TrainConfig, build_model, evaluate, fit_small_model

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "protein_performer" / "studies"
EVAL_BATCH_SIZE = 32
# the exact-softmax BID Transformer of studies 1 and 3
EXACT_SHAPE = dict(vocab_size=29, max_len=512, dim=64, depth=2, heads=4, dim_head=16, ff_dim=128, dropout=0.0)


def _cache_key(attention: str, objective: str, shape: dict, cfg: TrainConfig, fasta: Path, device: str) -> str:
    """A hash of everything that determines the trained weights."""
    key_src = json.dumps(
        {
            "attention": attention,
            "objective": objective,
            "shape": shape,
            "cfg": vars(cfg),
            "device": torch.device(device).type,
            "fasta": str(Path(fasta).resolve()),
            "size": Path(fasta).stat().st_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key_src.encode()).hexdigest()[:16]


def pretrained(
    attention: str,
    objective: str,
    shape: dict,
    cfg: TrainConfig,
    fasta: Path = SAMPLE,
    device: str = "cpu",
    cache_dir: Path | None = DEFAULT_CACHE,
    progress: bool = True,
) -> tuple[PerformerLM, dict]:
    """A model trained with ``fit_small_model`` on ``fasta`` (90/10 split, seed ``cfg.seed``), cached on disk.

    The cache file is named by a hash of everything that determines the weights (attention kind,
    shape, training config, the FASTA's path and size), so studies 1 and 3 share one exact
    Transformer. Returns the model (eval mode, on ``device``) and ``{"valid": metrics, "train_s":
    seconds, "cached": bool}``. ``cache_dir=None`` always trains.
    """
    key = _cache_key(attention, objective, shape, cfg, fasta, device)
    path = None if cache_dir is None else Path(cache_dir) / f"{attention}-{objective}-{key}.pt"
    model = build_model(attention, objective == "uni", cfg.seed, **shape)
    if path is not None and path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["state_dict"])
        log.info("loaded the trained %s model from %s", attention, path)
        return model.to(device).eval(), {**blob["meta"], "cached": True}
    train_seqs, valid_seqs, _ = load_split(fasta, cfg.seed)
    t0 = time.perf_counter()
    history = fit_small_model(model, train_seqs, cfg, device, progress=progress, desc=f"train {attention} {objective}")
    meta = {
        "valid": evaluate(model, eval_batches(valid_seqs, objective, cfg.max_length, EVAL_BATCH_SIZE), device),
        "train_s": time.perf_counter() - t0,
        "final_train_loss": history[-1]["train_loss"],
    }
    if path is not None:
        with atomic_output(path) as tmp:  # a concurrent reader sees the old state or the whole file
            torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
        log.info("cached the trained %s model in %s", attention, path)
    return model.eval(), {**meta, "cached": False}


def exact_reference(
    steps: int,
    seed: int = 0,
    fasta: Path = SAMPLE,
    device: str = "cpu",
    cache_dir: Path | None = DEFAULT_CACHE,
    progress: bool = True,
    max_length: int = 256,
    batch_size: int = 16,
) -> tuple[PerformerLM, dict, dict, TrainConfig]:
    """The exact BID Transformer of studies 1 and 3: (model, meta, shape, training config)."""
    cfg = TrainConfig(objective="bid", max_length=max_length, batch_size=batch_size, steps=steps, seed=seed)
    model, meta = pretrained("exact", "bid", EXACT_SHAPE, cfg, fasta, device, cache_dir, progress)
    return model, meta, dict(EXACT_SHAPE), cfg


@torch.no_grad()
def capture_qkv(model: PerformerLM, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Queries, keys and values of every layer, each (b, h, l, d), captured with forward hooks on
    the ``to_q`` / ``to_k`` / ``to_v`` projections (learned positions: no rotary rotation applies)."""
    if model.pos_emb is None:
        raise ValueError("capture_qkv needs learned positions (rotary q, k are rotated after the projection)")
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        for name in ("to_q", "to_k", "to_v"):

            def hook(module, inputs, output, i=i, name=name):
                store[(i, name)] = output.detach()

            handles.append(getattr(block.attn, name).register_forward_hook(hook))
    try:
        model.eval()(tokens)
    finally:
        for h in handles:
            h.remove()
    return [
        tuple(block.attn.split_heads(store[(i, n)]) for n in ("to_q", "to_k", "to_v"))
        for i, block in enumerate(model.blocks)
    ]
