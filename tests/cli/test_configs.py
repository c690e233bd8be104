"""Hydra configs: every experiment composes and builds; the six 36-layer paper runs take one real
training step on CPU (slow); trainer / logger / launcher groups compose and instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from protein_performer.model.performer import PerformerLM
from protein_performer.training.train import train

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPER_RUNS = [f"trembl_{o}_{m}" for o in ("uni", "bid") for m in ("transformer", "performer_relu", "performer_softmax")]


def make_cfg(overrides: list[str], return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


def test_all_experiments_are_present():
    assert set(PAPER_RUNS + ["trembl_concat_8192", "demo"]) <= set(EXPERIMENTS)
    assert (CONF / "hydra" / "launcher" / "submitit_slurm.yaml").is_file()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(experiment, tmp_path):
    cfg = make_cfg([f"experiment={experiment}", "data.root=/nonexistent", f"run_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.name == experiment
    assert cfg.data.objective == cfg.module.objective == cfg.objective
    assert cfg.model.causal == (cfg.objective == "uni")
    assert cfg.model.max_len >= cfg.data.max_length or cfg.data.packing
    with torch.device("meta"):  # shapes only: the 36-layer models are built without memory
        model = instantiate(cfg.model)
    assert isinstance(model, PerformerLM)
    if experiment in PAPER_RUNS:
        c = model.config
        assert (c.depth, c.heads, c.dim, c.dim_head, c.ff_dim, c.nb_features, c.max_len) == (
            36,
            8,
            512,
            64,
            1024,
            256,
            1024,
        )
        assert (
            c.attention
            == {"transformer": "exact", "performer_relu": "favor_relu", "performer_softmax": "favor_softmax"}[
                experiment.split("_", 2)[2]
            ]
        )
        assert cfg.trainer.gradient_clip_val == 0.5 and cfg.module.lr == 1e-3 and cfg.module.weight_decay == 0.1
        assert tuple(cfg.module.betas) == (0.9, 0.98) and cfg.module.eps == 1e-9 and c.dropout == 0.1
    if experiment == "trembl_concat_8192":
        assert cfg.data.packing and cfg.data.block_size == 8192 == model.config.max_len and model.config.depth == 6
    callbacks = {k: instantiate(v) for k, v in cfg.callbacks.items() if v}
    assert {"checkpoint", "redraw", "throughput"} <= set(callbacks)


@pytest.mark.parametrize("debug", ["fast_dev_run", "overfit"])
def test_debug_configs_compose(debug):
    cfg = make_cfg(["experiment=demo", f"debug={debug}", "data.root=x", "run_dir=x"])
    assert cfg.logger is None
    assert cfg.trainer.fast_dev_run is True if debug == "fast_dev_run" else cfg.trainer.overfit_batches == 1


def test_objective_drives_data_and_model():
    for objective, causal in (("uni", True), ("bid", False)):
        cfg = make_cfg(["experiment=trembl_bid_performer_relu", f"objective={objective}", "data.root=x", "run_dir=x"])
        assert cfg.data.objective == objective and cfg.model.causal is causal


def test_run_dir_and_hydra_settings():
    cfg = make_cfg(["experiment=demo"], return_hydra_config=True)
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.run.dir.startswith("runs/${name}/") or cfg.hydra.run.dir.startswith("runs/demo/")


def test_slurm_launcher_composes():
    cfg = make_cfg(
        [
            "experiment=trembl_bid_performer_relu",
            "hydra/launcher=submitit_slurm",
            "trainer=multinode",
            "data.root=x",
            "run_dir=x",
        ],
        return_hydra_config=True,
    )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")


def test_trainers_instantiate_on_cpu(tmp_path):
    for trainer, extra in (("cpu", []), ("ddp", ["trainer.devices=1"]), ("fsdp", ["trainer.devices=1"])):
        cfg = make_cfg(
            [
                "experiment=demo",
                "data.root=x",
                f"run_dir={tmp_path}",
                f"trainer={trainer}",
                "trainer.accelerator=cpu",
                "trainer.precision=32-true",
                *extra,
            ]
        )
        if trainer == "fsdp":
            strategy = instantiate(cfg.trainer.strategy)
            from protein_performer.model.performer import Block

            assert type(strategy).__name__ == "FSDPStrategy"
            assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
            continue
        pl_trainer = instantiate(cfg.trainer, logger=False)
        assert pl_trainer.gradient_clip_val == 0.5
        assert pl_trainer.max_steps == cfg.trainer.max_steps


def test_wandb_logger_offline_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert make_cfg(["experiment=demo", "data.root=x", f"run_dir={tmp_path}"]).logger.offline is True
    monkeypatch.setenv("WANDB_MODE", "online")
    assert make_cfg(["experiment=demo", "data.root=x", f"run_dir={tmp_path}"]).logger.offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(["experiment=demo", "data.root=x", f"run_dir={tmp_path}", "logger.offline=false"])
    assert cfg.logger.offline is False
    assert cfg.logger.save_dir == str(tmp_path)
    assert make_cfg(["logger=csv", "data.root=x", f"run_dir={tmp_path}"]).logger._target_.endswith("CSVLogger")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", PAPER_RUNS)
def test_paper_run_takes_one_training_step_on_cpu(experiment, tmp_path, shard_root):
    """The full 36-layer model of each paper run, on real shards, one optimizer step (batch 1, L 32)."""
    cfg = make_cfg(
        [
            f"experiment={experiment}",
            f"data.root={shard_root}",
            f"run_dir={tmp_path}",
            "trainer=cpu",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "data.batch_size=1",
            "data.max_length=32",
            "data.num_workers=0",
            "data.pin_memory=false",
            "validate=false",
            "test=false",
            "~logger",
            "callbacks.checkpoint.dirpath=null",
            "~callbacks.checkpoint",
            "callbacks.redraw.redraw_interval=0",  # skip re-drawing 36 layers: time
            "num_threads=1",
        ]
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 1
    assert 2.0 < metrics["train/loss"] < 5.0  # about log(29) = 3.37 at initialisation
    assert metrics["train/grad_norm"] > 0


def test_family_contacts_aligned_is_the_factored_model_with_performer_attention(tmp_path):
    """The recipe's aligned experiment takes model=factored (queries and keys learned per position) with
    Performer-ReLU attention (m 64) by default; an experiment on exact attention sets none of the FAVOR+
    options, which would do nothing there."""
    cfg = make_cfg(["experiment=family_contacts_aligned", "data.root=/nonexistent", f"run_dir={tmp_path}"])
    m = cfg.model
    assert m.nb_features == 64
    assert (m.attention, m.qk, m.depth, m.heads, m.dim_head, m.dim, m.ff_dim) == (
        "favor_relu",
        "position",
        1,
        32,
        32,
        128,
        256,
    )
    assert (m.init, m.tie_embeddings, m.positions, m.dropout) == ("torch", False, "learned", 0.0)
    for name in ("family_contacts", "family_contacts_aligned"):
        raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
        attention = make_cfg([f"experiment={name}", "data.root=/x", f"run_dir={tmp_path}"]).model.attention
        if attention == "exact":
            assert "nb_features" not in raw.get("model", {}) and "favor_kwargs" not in raw.get("model", {}), name
            assert "redraw" not in raw.get("callbacks", {}), name
