"""``train(cfg) -> metrics``: build everything from the Hydra config, fit, evaluate, write metrics.json.

Config contract (``conf/train.yaml``): ``data``, ``model``, ``module``, ``trainer`` are ``_target_``
nodes; ``callbacks`` a dict of ``_target_`` nodes (null entries skipped); ``logger`` one
``_target_`` node or null; ``run_dir`` the output folder; ``ckpt_path`` null, a path, or ``last``
(``<run_dir>/checkpoints/last.ckpt``; a fresh start when there is none).

Exact resume: the weights, optimizer, scheduler and step come from Lightning's checkpoint; the
random features are buffers of the model's state dict; dropout is seeded per step
(``module.ProteinLM``); the training loader is wrapped by ``resume.ResumableLoader``, so a run
resumed in the middle of an epoch continues with the next batch of the same order.

Crash safety: checkpoints are written to a temporary file and renamed (``checkpoint_io``), so a
job killed at any instant leaves every ``*.ckpt`` complete; ``ckpt_path`` is checked before
anything is written (a truncated file, or a checkpoint of another model shape, is a one-line
:class:`~protein_performer.errors.UserError`). Settings that are valid but pathological on the
hardware are corrected or warned about first (``config_checks``).

Composing the config without ``@hydra.main`` (Hydra's compose API, notebooks, ``make demo``):
pass ``run_dir=<folder>``, since ``${hydra:runtime.output_dir}`` exists only under ``hydra.main``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from protein_performer.errors import UserError
from protein_performer.training.checkpoint_io import AtomicCheckpointIO, check_checkpoint
from protein_performer.training.config_checks import check_training_config
from protein_performer.training.resume import EpochProgressRepair, make_resumable
from protein_performer.training.utils import is_causal, register_resolvers

log = logging.getLogger(__name__)

register_resolvers()


def _to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return float(v) if v.numel() == 1 else v.tolist()
    return v


def _wandb_run_id(run_dir: Path) -> str | None:
    """A W&B run id kept in the run folder, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    return None


def new_run_id() -> str:
    """8 random lowercase letters and digits (the form of W&B run ids)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def build_logger(cfg: DictConfig, run_dir: Path):
    node = cfg.get("logger")
    if not node:
        return False
    node = OmegaConf.to_container(node, resolve=True)
    if "WandbLogger" in str(node.get("_target_", "")):
        (run_dir / node.get("save_dir", str(run_dir))).mkdir(parents=True, exist_ok=True)
        run_id = node.get("id") or _wandb_run_id(run_dir) or new_run_id()
        node["id"] = run_id
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
            (run_dir / "wandb_run_id.txt").write_text(run_id)
    return instantiate(node)


def log_run_info(logger, cfg: DictConfig, model: torch.nn.Module) -> None:
    """The resolved config and the model summary (parameter counts) into the logger."""
    if not logger:
        return
    hparams = OmegaConf.to_container(cfg, resolve=True)
    summary = (
        model.summary() if hasattr(model, "summary") else {"params_total": sum(p.numel() for p in model.parameters())}
    )
    hparams["model_summary"] = summary
    logger.log_hyperparams(hparams)
    experiment = getattr(logger, "experiment", None)
    summary_obj = getattr(experiment, "summary", None)
    if summary_obj is not None and hasattr(summary_obj, "update"):
        try:
            summary_obj.update({f"model/{k}": v for k, v in summary.items()})
        except Exception as e:  # a disabled / dummy W&B run has no writable summary
            log.warning("could not write the model summary to W&B: %s", e)


class ConfigError(UserError, ValueError):
    """Settings that contradict each other (also a ValueError, as these errors always were)."""


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last`` -> ``<run_dir>/checkpoints/last.ckpt`` when it exists (else a fresh start)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
        if path.exists():
            return str(path)
        log.warning(
            "ckpt_path=last but %s does not exist: starting from scratch (to resume a run, give its folder: "
            "hydra.run.dir=<the run's folder>, or run_dir=<folder> without hydra.main)",
            path,
        )
        return None
    path = Path(ckpt_path)
    if not path.exists():
        raise UserError(
            f"ckpt_path={ckpt_path}: no such checkpoint; give the path of a .ckpt file, or ckpt_path=last "
            f"to resume the run in run_dir"
        )
    if path.is_dir() and not (path / "meta.pt").exists() and not any(path.glob("*.distcp")):
        raise UserError(
            f"ckpt_path={ckpt_path}: is a folder, but a checkpoint file is expected (e.g. "
            f"{path / 'last.ckpt'} if it holds the run's checkpoints)"
        )
    return str(ckpt_path)


def check_objective(cfg: DictConfig) -> None:
    """The data objective and the model's attention direction must agree (UNI <=> causal)."""
    objective = cfg.get("objective")
    data_obj = cfg.data.get("objective", objective)
    causal = cfg.model.get("causal")
    if objective is not None and data_obj != objective:
        raise ConfigError(f"data.objective={data_obj!r} but objective={objective!r}; set only objective=")
    try:
        causal_needed = is_causal(data_obj)
    except ValueError as e:
        raise ConfigError(f"{e}: set objective=uni or objective=bid") from e
    if causal is not None and bool(causal) != causal_needed:
        raise ConfigError(f"model.causal={causal} does not fit objective {data_obj!r} (uni needs causal=true)")


def _plugins(trainer_cfg: DictConfig) -> list:
    """The trainer's plugins from the config, plus :class:`AtomicCheckpointIO` unless the config
    brings its own checkpoint IO (as a plugin or in the strategy)."""
    from lightning_fabric.plugins import CheckpointIO

    plugins = trainer_cfg.get("plugins") or []
    plugins = [
        instantiate(p, _convert_="all") if isinstance(p, DictConfig) else p
        for p in (plugins if isinstance(plugins, (list, tuple)) or OmegaConf.is_list(plugins) else [plugins])
    ]
    strategy = trainer_cfg.get("strategy")
    own_io = isinstance(strategy, DictConfig) and strategy.get("checkpoint_io") is not None
    if not own_io and not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and evaluate one run; returns the final metrics (also written to ``<run_dir>/metrics.json``).

    ``num_threads`` (optional) sets PyTorch's intra-op threads for the run and restores them after:
    on a CPU shared with other jobs, 2 threads that wait on each other at every operation can be
    several times slower than 1.
    """
    threads = cfg.get("num_threads")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: DictConfig) -> dict[str, float]:
    check_objective(cfg)
    cfg = check_training_config(cfg)  # a copy: a sensible precision for the hardware, warnings
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    # _convert_="all": plain lists and dicts, never OmegaConf containers, go into checkpoints
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    module = instantiate(cfg.module, model=model, _convert_="all")
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    if ckpt_path is not None and cfg.get("fit", True):
        check_checkpoint(ckpt_path, module)  # complete, and of this model's shape: else one line, before any write
    callbacks = [
        instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c and c.get("_target_")
    ]
    callbacks.append(EpochProgressRepair())  # exact resume after a chain of resumes (resume.py)
    logger = build_logger(cfg, run_dir)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, plugins=_plugins(cfg.trainer), _convert_="all"
    )
    make_resumable(datamodule, trainer)  # ckpt_path resumes mid-epoch at the next batch
    log_run_info(logger, cfg, model)
    log.info("model: %s parameters", f"{model.num_parameters():,}" if hasattr(model, "num_parameters") else "?")

    metrics: dict[str, float] = {}
    if cfg.get("fit", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update({k: _to_float(v) for k, v in trainer.callback_metrics.items()})
        metrics["global_step"] = trainer.global_step
    if cfg.get("validate", True):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule, verbose=False)
    metrics.update({k: _to_float(v) for k, v in module.eval_results.items()})
    for cb in callbacks:
        for k, v in getattr(cb, "last", {}).items():
            metrics.setdefault(k, v)
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))} | {
        k: None for k, v in metrics.items() if isinstance(v, float) and math.isnan(v)
    }
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if logger and hasattr(logger, "log_metrics"):
            logger.log_metrics(
                {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.global_step
            )
        log.info("metrics written to %s", run_dir / "metrics.json")
    if logger and hasattr(logger, "finalize"):
        logger.finalize("success")
    if logger and "Wandb" in type(logger).__name__:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    return metrics
