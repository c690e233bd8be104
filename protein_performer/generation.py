"""Token-by-token sampling from a causal (UNI) PerformerLM with a recurrent state.

A causal FAVOR+ layer needs, for the next token t, only the prefix state of its keys and values
(paper Sec. 2.6): ``S_t = sum_{j<=t} k'_j v_j^T`` (m x d) and ``z_t = sum_{j<=t} k'_j`` (m), so
``out_t = q'_t^T S_t / q'_t^T z_t``. Carrying ``S`` and ``z`` from token to token makes the work per
new token O(1) in the length (O(depth (dim^2 + heads m d))), where recomputing the full causal
attention over the prefix costs O(t) per token with FAVOR+ and O(t^2) with exact attention.

The model steps itself (``PerformerLM.init_state`` / ``PerformerLM.step``, through ``Block.step``
and ``MultiHeadAttention.step``); the per-layer step is the kernel's: ``FavorAttention.step`` on a
``FavorState`` (the running key stabilizer and the eps floor are handled there, so the step equals
the last row of the full causal forward on the same prefix) or ``SoftmaxAttention.step`` on a
``KVCache`` (O(t) per token), so that the same ``generate`` runs a Transformer baseline. The
``RecurrentState`` carries the position and one such state per layer. This module holds the loops:
``prefill``, sampling (``sample_next``), ``generate`` and its reference ``generate_recompute``.

    state = init_state(model, batch=2)
    logits, state = step(model, tokens[:, t], state)        # logits for position t + 1
    out = generate(model, prompt, n_tokens=100, temperature=1.0, generator=torch.Generator().manual_seed(0))

``generate_recompute`` samples the same way but recomputes ``model(prefix)`` for every new token:
the reference the recurrent path must equal (same generator -> same tokens).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from protein_performer.model.performer import PerformerLM, RecurrentState

log = logging.getLogger(__name__)


def init_state(model: PerformerLM, batch: int, device: torch.device | str | None = None) -> RecurrentState:
    """An empty state for ``batch`` sequences (nothing fed yet): ``model.init_state``."""
    return model.init_state(batch, device)


def step(model: PerformerLM, tokens: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
    """Feed one token per sequence, tokens (b,) long, at position ``state.position``: ``model.step``.

    Returns the logits (b, vocab) for the next position and the new state. Runs the model's own
    modules (embeddings, LayerNorms, projections, feed-forward) on one position; dropout is the
    caller's business (use ``model.eval()``).
    """
    return model.step(tokens, state)


@torch.no_grad()
def prefill(
    model: nn.Module, tokens: torch.Tensor, state: RecurrentState | None = None
) -> tuple[torch.Tensor, RecurrentState]:
    """Feed tokens (b, l) one by one; returns the logits of every position (b, l, vocab) and the
    state. ``prefill(model, x)[0]`` equals ``model(x)["logits"]`` of a causal model (eval mode)."""
    state = init_state(model, tokens.shape[0], tokens.device) if state is None else state
    out = []
    for t in range(tokens.shape[1]):
        logits, state = step(model, tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1), state


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one id per row of logits (b, vocab): softmax(logits / temperature) restricted to the
    ``allowed`` ids (bool (vocab,)); temperature 0 takes the argmax. Returns (b,) long."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    probs = F.softmax(logits / temperature, dim=-1)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).view(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    n_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
    return_logits: bool = False,
):
    """Sample ``n_tokens`` continuations of prompt (b, p) (p >= 1, e.g. a bos column) with the
    recurrent state: O(1) work per new token for FAVOR+ layers. Returns tokens (b, p + n_tokens)
    and, with ``return_logits``, the logits every sampled token was drawn from (b, n_tokens, vocab).
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got {tuple(prompt.shape)}")
    logits_all, state = prefill(model, prompt)

    def next_logits(i: int, last: torch.Tensor | None, tokens: list[torch.Tensor]) -> torch.Tensor:
        nonlocal state
        if i == 0:
            return logits_all[:, -1]
        logits, state = step(model, last, state)
        return logits

    return _sample_tokens(prompt, n_tokens, temperature, generator, allowed, return_logits, next_logits)


@torch.no_grad()
def generate_recompute(
    model: nn.Module,
    prompt: torch.Tensor,
    n_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
    return_logits: bool = False,
):
    """The reference for :func:`generate`: every new token recomputes ``model(prefix)`` in full
    (the chunked causal FAVOR+ or exact attention over the whole prefix). Same arguments, same
    sampling; with the same generator state both return the same tokens."""

    def next_logits(i: int, last: torch.Tensor | None, tokens: list[torch.Tensor]) -> torch.Tensor:
        return model(torch.cat(tokens, dim=1))["logits"][:, -1]

    return _sample_tokens(prompt, n_tokens, temperature, generator, allowed, return_logits, next_logits)


def _sample_tokens(prompt, n_tokens, temperature, generator, allowed, return_logits, next_logits):
    """The sampling loop shared by :func:`generate` and :func:`generate_recompute`: token i is drawn
    from ``next_logits(i, previous token (b,) or None, tokens so far)``, so both draw from the
    generator in the same order. Returns tokens (b, p + n_tokens) [, logits (b, n_tokens, vocab)]."""
    tokens, drawn, last = [prompt], [], None
    for i in range(n_tokens):
        logits = next_logits(i, last, tokens)
        drawn.append(logits)
        last = sample_next(logits, temperature, generator, allowed)
        tokens.append(last[:, None])
    out = torch.cat(tokens, dim=1)
    return (out, torch.stack(drawn, dim=1)) if return_logits else out
