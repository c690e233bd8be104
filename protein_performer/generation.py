"""Token-by-token sampling from a causal (UNI) PerformerLM with a recurrent state.

A causal FAVOR+ layer needs, for the next token t, only the prefix state of its keys and values
(paper Sec. 2.6): ``S_t = sum_{j<=t} k'_j v_j^T`` (m x d) and ``z_t = sum_{j<=t} k'_j`` (m), so
``out_t = q'_t^T S_t / q'_t^T z_t``. Carrying ``S`` and ``z`` from token to token makes the work per
new token O(1) in the length (O(depth (dim^2 + heads m d))), where recomputing the full causal
attention over the prefix costs O(t) per token with FAVOR+ and O(t^2) with exact attention.

The per-layer step is ``FavorAttention.step`` (favor.py: the running key stabilizer and the eps
floor are handled there, so the step equals the last row of the full causal forward on the same
prefix). Exact-softmax layers get a key/value cache instead (O(t) per token), so that the same
``generate`` runs a Transformer baseline.

    state = init_state(model, batch=2)
    logits, state = step(model, tokens[:, t], state)        # logits for position t + 1
    out = generate(model, prompt, n_tokens=100, temperature=1.0, generator=torch.Generator().manual_seed(0))

``generate_recompute`` samples the same way but recomputes ``model(prefix)`` for every new token:
the reference the recurrent path must equal (same generator -> same tokens).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from protein_performer.model.attention import SoftmaxAttention
from protein_performer.model.favor import FavorAttention
from protein_performer.model.performer import apply_rotary

log = logging.getLogger(__name__)


@dataclass
class RecurrentState:
    """What a causal model carries from token to token.

    ``position``: index of the next token to be fed (0 for an empty state). ``layers``: one dict
    per block; FAVOR+ layers hold ``FavorAttention.init_state``'s S (b, h, m, d), z (b, h, m) and
    stabilizer (constant size), exact layers hold the key/value cache k, v (b, h, t, d) (grows).
    """

    position: int = 0
    layers: list[dict] = field(default_factory=list)

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant in ``position`` for FAVOR+ layers)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values() if torch.is_tensor(t))


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def check_causal(model: nn.Module) -> None:
    """Raise unless ``model`` is a causal PerformerLM whose kernels can step (FAVOR+ or exact)."""
    if not getattr(model.config, "causal", False):
        raise ValueError("recurrent generation needs a causal (UNI) model; this one has causal=False")
    for i, block in enumerate(model.blocks):
        kernel = block.attn.kernel
        if not isinstance(kernel, (FavorAttention, SoftmaxAttention)):
            raise TypeError(f"layer {i}: cannot step a {type(kernel).__name__} kernel (FAVOR+ or exact only)")
        if not kernel.causal:
            raise ValueError(f"layer {i}: the attention kernel is not causal")


def init_state(model: nn.Module, batch: int, device: torch.device | str | None = None) -> RecurrentState:
    """An empty state for ``batch`` sequences (nothing fed yet)."""
    check_causal(model)
    device = next(model.parameters()).device if device is None else device
    dtype = torch.promote_types(_param_dtype(model), torch.float32)
    layers = []
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn.kernel, FavorAttention):
            layers.append(attn.kernel.init_state(batch, attn.heads, attn.dim_head, device=device, dtype=dtype))
        else:
            empty = torch.zeros(batch, attn.heads, 0, attn.dim_head, device=device, dtype=_param_dtype(model))
            layers.append({"k": empty, "v": empty.clone()})
    return RecurrentState(0, layers)


def _rotary_at(position: int, dim_head: int, device, dtype, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at one position, (1, d/2): the row ``position`` of
    ``performer.rotary_tables`` computed with the same float32 operations, without the O(t) table."""
    inv_freq = base ** (-torch.arange(0, dim_head, 2, device=device, dtype=torch.float32) / dim_head)
    angles = torch.einsum("l,f->lf", torch.tensor([float(position)], device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _exact_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """softmax(q_t K_{<=t}^T / sqrt(d)) V_{<=t} with the key/value cache; q, k, v: (b, h, 1, d)."""
    keys = torch.cat([cache["k"], k], dim=2)  # (b, h, t+1, d)
    values = torch.cat([cache["v"], v], dim=2)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(dtype), keys.to(dtype)) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), values.to(dtype))
    return out.to(v.dtype), {"k": keys, "v": values}


@torch.no_grad()
def step(model: nn.Module, tokens: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
    """Feed one token per sequence, tokens (b,) long, at position ``state.position``.

    Returns the logits (b, vocab) for the next position and the new state. Runs the model's own
    modules (embeddings, LayerNorms, projections, feed-forward) on one position; dropout is the
    caller's business (use ``model.eval()``).
    """
    pos = state.position
    if model.pos_emb is not None and pos >= model.config.max_len:
        raise ValueError(f"position {pos} >= max_len {model.config.max_len} of the learned positions")
    b = tokens.shape[0]
    x = model.token_emb(tokens.view(b, 1))  # (b, 1, dim)
    if model.pos_emb is not None:
        x = x + model.pos_emb.weight[pos].view(1, 1, -1)
    x = model.emb_dropout(x)
    layers = []
    for block, layer_state in zip(model.blocks, state.layers):
        attn = block.attn
        h = block.ln1(x)
        q, k, v = attn._split(attn.to_q(h)), attn._split(attn.to_k(h)), attn._split(attn.to_v(h))  # (b, h, 1, d)
        if attn.rotary:
            cos, sin = _rotary_at(pos, attn.dim_head, x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(attn.kernel, FavorAttention):
            out, new = attn.kernel.step(q, k, v, layer_state)
        else:
            out, new = _exact_step(q, k, v, layer_state)
        layers.append(new)
        x = x + block.dropout(attn.to_out(out.transpose(1, 2).reshape(b, 1, attn.heads * attn.dim_head)))
        x = x + block.dropout(block.ff(block.ln2(x)))
    logits = model.lm_head(model.norm(x))[:, 0]
    return logits, RecurrentState(pos + 1, layers)


@torch.no_grad()
def prefill(model: nn.Module, tokens: torch.Tensor, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
    """Feed tokens (b, l) one by one; returns the logits of every position (b, l, vocab) and the
    state. ``prefill(model, x)[0]`` equals ``model(x)["logits"]`` of a causal model (eval mode)."""
    state = init_state(model, tokens.shape[0], tokens.device) if state is None else state
    out = []
    for t in range(tokens.shape[1]):
        logits, state = step(model, tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1), state


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
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
