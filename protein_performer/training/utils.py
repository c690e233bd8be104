"""Small helpers shared by the training code: stable seeds, tensor hashes, OmegaConf resolvers."""

from __future__ import annotations

import hashlib
import os
import struct

import torch

OBJECTIVES = ("uni", "bid")


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (ints or strings), the same in every process and Python run.

    BLAKE2b of the parts' text, not Python's ``hash`` (randomised per process for strings).
    """
    text = "\x1f".join(str(p) for p in parts).encode()
    return struct.unpack("<Q", hashlib.blake2b(text, digest_size=8).digest())[0] >> 1


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's bytes, dtype and shape included."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def is_causal(objective: str) -> bool:
    """``uni`` -> causal attention, ``bid`` -> bidirectional; anything else is an error."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective == "uni"


def wandb_offline() -> bool:
    """W&B runs offline unless ``WANDB_MODE=online`` is set in the environment."""
    return os.environ.get("WANDB_MODE", "offline").lower() != "online"


def register_resolvers() -> None:
    """``${pp.causal:${objective}}`` and ``${pp.wandb_offline:}`` for the Hydra configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("pp.causal"):
        OmegaConf.register_new_resolver("pp.causal", is_causal)
    if not OmegaConf.has_resolver("pp.wandb_offline"):
        OmegaConf.register_new_resolver("pp.wandb_offline", wandb_offline)


def module_classes(names: list[str]) -> set[type]:
    """The classes named by dotted paths, as a set (FSDP's ``auto_wrap_policy`` from a config)."""
    import importlib

    out = set()
    for name in names:
        mod, _, cls = name.rpartition(".")
        out.add(getattr(importlib.import_module(mod), cls))
    return out
