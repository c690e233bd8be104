"""``method=attention_potts`` of the family-contacts tool (:mod:`.tool`): its settings, the fit
(train stage) and the query's map (contacts stage)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from protein_performer.errors import UserError
from protein_performer.model import attention_potts
from protein_performer.recipes.family_contacts.query_map import (
    MIN_SEP,
    Z_INTERCEPT,
    headline,
    structure_scores,
    write_contacts,
)
from protein_performer.recipes.family_contacts.run import RunPaths

if TYPE_CHECKING:
    from protein_performer.recipes.family_contacts.tool import Prepared

# the overrides it takes (``model.<field>`` of AttentionPottsConfig, and the fit's)
KEYS = {
    "model.attention": ("config", "attention", str),
    "model.heads": ("config", "heads", int),
    "model.dim_head": ("config", "dim_head", int),
    "model.nb_features": ("config", "nb_features", int),
    "seed": ("config", "seed", int),
    "module.lr": ("fit", "lr", float),
    "data.batch_size": ("fit", "batch_size", int),
    "trainer.max_steps": ("fit", "max_steps", int),
}


def settings(overrides: Sequence[str]) -> tuple[dict, dict, int | None]:
    """The attention-Potts model's config fields, the fit's keywords and the thread count given by
    ``overrides`` (:data:`KEYS`, ``num_threads``); anything else is a :class:`UserError`."""
    config, fit, threads = {}, {}, None
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key not in KEYS and key != "num_threads":
            raise UserError(
                f"family_contacts method=attention_potts: {o!r} is not one of its settings "
                f"({', '.join([*KEYS, 'num_threads'])}); the other Hydra overrides train method=lm"
            )
        where, field, kind = KEYS.get(key, ("threads", "", int))
        try:
            typed = kind(value) if value.lower() not in ("null", "none", "") else None
        except ValueError:
            raise UserError(f"family_contacts: {key} must be {kind.__name__}, got {value!r}") from None
        if where == "threads":
            threads = typed
        elif typed is not None:
            (config if where == "config" else fit)[field] = typed
    try:
        attention_potts.AttentionPottsConfig(length=2, **config)
    except ValueError as e:
        raise UserError(f"family_contacts method=attention_potts: {e}") from None
    return config, fit, threads


def train_stage(paths: RunPaths, prepared: Prepared, minutes: float, overrides: Sequence[str], summary: dict):
    """Fit the attention-Potts model on the prepared rows for ``minutes``; ``<OUT>/checkpoints/last.ckpt``."""
    import torch

    config, fit, threads = settings(overrides)
    if threads:
        torch.set_num_threads(threads)
    model = attention_potts.AttentionPotts(
        attention_potts.AttentionPottsConfig(length=prepared.states.shape[1], **config)
    )
    info = attention_potts.fit(model, prepared.states, prepared.weights, minutes * 60, seed=model.config.seed, **fit)
    extra = {"query_id": prepared.query_id, "query": prepared.query, "positions": prepared.positions.tolist()}
    attention_potts.save(model, paths.checkpoint, **extra)
    summary["train"] = {**info, "model": dict(model.config.__dict__), "threads": torch.get_num_threads()}


def contacts_stage(paths: RunPaths, prepared: Prepared, structure: str | None, summary: dict) -> None:
    """The head of the fitted model (:func:`.potts.query_head`), the query's map through
    ``predict_contacts`` and its files, and the scores against ``structure`` (the random-init twin:
    the same model with its initial weights)."""
    from dataclasses import replace

    from protein_performer.analysis.contacts import potts
    from protein_performer.analysis.contacts.predict import predict_contacts

    loaded = potts.load_potts(paths.checkpoint)
    head = potts.query_head(loaded, MIN_SEP, Z_INTERCEPT)
    head_path = head.save(paths.out / "contact_head.json")
    (pred,) = predict_contacts(loaded, head, [(prepared.query_id, prepared.query)])
    top = write_contacts(paths.out, pred, head_path)
    summary["contacts"] = {"model": "attention_potts", "head": head_path.name, "L": len(prepared.query)}
    summary["contacts"]["top_pair"] = list(top[0]) if top else []
    if structure:
        untrained = replace(loaded, model=attention_potts.AttentionPotts(loaded.model.config))
        random_map = potts.probabilities(potts.query_head(untrained, MIN_SEP, Z_INTERCEPT), untrained)
        headline(summary, structure_scores(pred.contacts, random_map, prepared.query, structure))
