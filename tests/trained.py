"""Models the analysis tests share: a tiny demo-architecture checkpoint trained by the training code
(:func:`trained_checkpoint`, cached once per session) and tiny random-init models (:func:`tiny_model`).
Tests import them (``from trained import trained_checkpoint``), as they do ``killing``."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import REPO, tiny_overrides

from protein_performer.model.performer import PerformerConfig, PerformerLM

STRUCTURES = REPO / "data" / "structures" / "biopython"

TINY_TRAIN = tiny_overrides(
    "model.max_len=600",
    "trainer.max_steps=3",
    "callbacks.redraw.redraw_interval=2",
    "validate=false",
    "test=false",
    "~logger",
)


def trained_checkpoint(tmp_path_factory) -> Path:
    """A demo-architecture model made tiny (2 layers x 2 heads, FAVOR+ ReLU, max_len 600),
    trained for 3 steps by the training code on the embedded Swiss-Prot sample (features redrawn
    at steps 0 and 2). Cached in the session's base temp folder (test_notebooks uses it too)."""
    root = tmp_path_factory.getbasetemp() / "export_trained"
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt
    from hydra import compose, initialize_config_dir

    from protein_performer.data.ingest import ingest
    from protein_performer.training.train import train

    shards = root / "shards"
    ingest(
        input=str(REPO / "data" / "swissprot_sample.fasta.gz"),
        output_dir=str(shards),
        workers=1,
        progress=False,
        fractions={"train": 0.8, "valid": 0.1, "test": 0.1},
    )
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*TINY_TRAIN, f"data.root={shards}", f"run_dir={root / 'run'}"],
        )
    metrics = train(cfg)
    assert metrics["global_step"] == 3 and ckpt.exists()
    return ckpt


def tiny_model(attention: str, causal: bool, seed: int = 0, max_len: int = 128, **kw) -> PerformerLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=29,
        max_len=max_len,
        dim=32,
        depth=2,
        heads=4,
        dim_head=8,
        ff_dim=64,
        dropout=0.1,
        attention=attention,
        causal=causal,
        nb_features=32,
        favor_kwargs={"seed": 7},
    )
    cfg.update(kw)
    return PerformerLM(PerformerConfig(**cfg)).eval()
