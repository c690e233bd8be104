"""Trained models where a user looks for them (as ``esm.pretrained``)::

    from protein_performer.pretrained import load_model
    model, tokenizer = load_model("last.ckpt")               # a PerformerLM in eval mode, its Tokenizer
    lm = load_model("random", model_config="last.ckpt", seed=0)  # random init: the contact baseline
    lm.model, lm.tokenizer, lm.sha256, lm.config

One loader for every command that reads a checkpoint (``export_attention``, ``embed``,
``predict_contacts``, the family-contacts recipe): the architecture from the Lightning
checkpoint's ``hyper_parameters["model"]`` (or ``model_config``), the weights and FAVOR+ features
from its ``state_dict``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.errors import MissingFileError, UserError, first_line
from protein_performer.model.performer import PerformerConfig, PerformerLM

log = logging.getLogger(__name__)

RANDOM = "random"  # checkpoint=random: a random-init model (the contact baseline)


class CheckpointError(UserError, ValueError):
    """A checkpoint or model config that cannot make a model (one line: the file, what to do)."""


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, and where it came from; unpacks as ``model, tokenizer``."""

    model: PerformerLM
    checkpoint: str  # the .ckpt path, or "random"
    sha256: str = ""  # of the checkpoint file ("" for random init)
    seed: int | None = None  # random init: the seed of the weights
    info: dict[str, Any] = field(default_factory=dict)  # objective, global_step, ... from the checkpoint
    tokenizer: Tokenizer = field(default_factory=Tokenizer)

    @property
    def config(self) -> dict[str, Any]:
        """The model's :class:`PerformerConfig` as a plain dict."""
        return asdict(self.model.config)

    def __iter__(self) -> Iterator[PerformerLM | Tokenizer]:
        """``model, tokenizer = load_model(...)`` (as ``esm.pretrained``)."""
        return iter((self.model, self.tokenizer))


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint with objects beyond tensors and plain containers
        log.debug("%s: weights_only load failed (%s); loading it in full (trusted file)", path, e)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CheckpointError(
                f"{path}: not a readable PyTorch / Lightning checkpoint, or a truncated / corrupted one "
                f"({first_line(e2)}); give the .ckpt that training wrote"
            ) from e2


def _first_problem(e: BaseException) -> str:
    """The first specific line of a load_state_dict error (a size mismatch or a missing key)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


def _plain(x: Any) -> Any:
    """OmegaConf containers and tuples -> plain dicts / lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _check_config(cfg: dict, where: str) -> dict:
    cfg = {k: v for k, v in _plain(cfg).items() if k != "_target_"}
    known = {f.name for f in fields(PerformerConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{where}: model config keys {unknown} are not PerformerLM arguments ({sorted(known)})")
    return cfg


def model_config_from(source: dict | str | Path) -> dict:
    """PerformerLM kwargs from a dict, a Lightning checkpoint (``hyper_parameters["model"]``) or a
    YAML / JSON file holding them (a ``_target_`` key is ignored)."""
    if isinstance(source, dict) or not isinstance(source, (str, Path)):
        return _check_config(dict(_plain(source)), "model_config")
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"model_config: no such file {path}")
    if path.suffix in (".yaml", ".yml", ".json"):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            cfg = cfg["model"]
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: expected a mapping of PerformerLM arguments")
        return _check_config(cfg, str(path))
    return _config_from_checkpoint(_torch_load(path), path)


def _config_from_checkpoint(ckpt: dict, path: Path) -> dict:
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    cfg = hp.get("model") if isinstance(hp, dict) else None
    if not isinstance(cfg, dict) and cfg is not None:
        cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{path}: the checkpoint stores no model config in hyper_parameters['model'] "
            "(train with protein_performer.training.ProteinLM, or pass model_config=)"
        )
    return _check_config(cfg, str(path))


def _build(cfg: dict, source: Any) -> PerformerLM:
    try:
        return PerformerLM(PerformerConfig(**cfg))
    except (ValueError, TypeError) as e:
        where = "model_config (dict)" if isinstance(source, dict) else str(source)
        raise CheckpointError(f"{where}: not a valid PerformerLM config ({first_line(e)})") from e


def load_model(
    checkpoint: str | Path,
    model_config: dict | str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """A :class:`PerformerLM` in eval mode and its tokenizer (a :class:`LoadedModel`, which unpacks as
    ``model, tokenizer``), from a Lightning checkpoint of ``ProteinLM`` or random.

    ``checkpoint``: a ``.ckpt`` path; the architecture comes from ``hyper_parameters["model"]``
    (``model_config`` overrides it when given) and the weights and FAVOR+ features from
    ``state_dict`` (the ``model.`` prefix stripped; every key must fit). ``checkpoint="random"``:
    a random-init model of the architecture ``model_config`` (a dict, a checkpoint or a YAML
    file), weights drawn from ``seed`` without touching the global RNG: the contact baseline.
    """
    if str(checkpoint) == RANDOM:
        return _random_model(model_config, seed, device)
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint (no 'state_dict'); give the .ckpt that training wrote"
        )
    cfg = _config_from_checkpoint(ckpt, path) if model_config is None else model_config_from(model_config)
    model = _build(cfg, model_config if model_config is not None else path)
    state = ckpt["state_dict"]
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the model config {cfg} ({_first_problem(e)}); give "
            "the model_config the checkpoint was trained with, or none (it is read from the "
            "checkpoint)"
        ) from e
    hp = ckpt.get("hyper_parameters") or {}
    info = {"objective": hp.get("objective"), "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}
    log.info(
        "loaded %s (step %s): %s",
        path,
        info["global_step"],
        {k: cfg.get(k) for k in ("attention", "causal", "depth", "heads", "dim")},
    )
    return LoadedModel(model.to(device).eval().requires_grad_(False), str(path), file_sha256(path), None, info)


def _random_model(model_config: dict | str | Path | None, seed: int, device: str | torch.device) -> LoadedModel:
    """``checkpoint=random``: the architecture of ``model_config``, weights drawn from ``seed`` in a
    forked RNG (the global one is left as it was)."""
    if model_config is None:
        raise CheckpointError(
            "checkpoint=random needs model_config= (a trained checkpoint, a YAML file or a dict) for the architecture"
        )
    cfg = model_config_from(model_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = _build(cfg, model_config)
    log.info("random-init model (seed %d): %s", seed, {k: cfg.get(k) for k in ("attention", "depth", "heads", "dim")})
    return LoadedModel(
        model.to(device).eval().requires_grad_(False),
        RANDOM,
        "",
        int(seed),
        {"source": str(model_config) if not isinstance(model_config, dict) else "dict"},
    )
