"""PerformerLM: a pre-LN Transformer language model whose attention is FAVOR+ or exact softmax.

    tokens (b, l) -> token embedding (+ learned positions) -> depth x Block -> LayerNorm -> LM head

    Block(x) = x + Dropout(Attn(LN(x)))           Attn: FAVOR+ softmax / FAVOR+ ReLU / exact softmax
             x + Dropout(FF(LN(x)))               FF: Linear(dim, ff_dim) -> GELU -> Dropout -> Linear

The architecture is one :class:`PerformerConfig` (``PerformerLM(PerformerConfig(depth=4))``, as
nanoGPT's ``GPT(config)``); the attention type is its ``attention`` field (``favor_softmax`` /
``favor_relu`` / ``exact``), FAVOR+'s feature map is ``FavorAttention``'s ``kernel`` (from
``favor_kwargs``, else the attention's: ``FAVOR_KERNELS``).

Every attention kind has the same parameters (``to_q``, ``to_k``, ``to_v``, ``to_out`` per layer);
the kernels (``attn.kernel``) hold buffers only (FAVOR+'s random projection), so the weights of an
exact-attention model load into a FAVOR+ model of the same shape: the paper's backward-compatibility
experiment (see :meth:`PerformerLM.load_backbone`). With ``qk="position"`` (factored attention, for
models of one family aligned to one chain) ``to_q`` / ``to_k`` give way to learned per-position
queries and keys ``q_pos`` / ``k_pos``; ``init="torch"`` keeps PyTorch's own initialisation of each
layer instead of N(0, 0.02).

``forward(tokens, key_padding_mask=None, return_attention=False)`` returns
``dict(logits=(b, l, vocab), attentions=[per layer (b, h, l, l)])``; the maps come from each
kernel's ``attention_matrix`` on the same queries and keys as the forward pass. The same pass, read
out: ``hidden_states`` (one layer at a time), ``representations`` (after the last LayerNorm, no LM
head) and ``attention_maps`` (``(layer, maps)`` one layer at a time, for export and contacts); the
model's input for a sequence is ``Tokenizer.frame``'s.

A causal model also decodes token by token (``init_state``, ``step``; sampling loops in
:mod:`protein_performer.generation`): each block runs the same modules on one position and its
kernel carries a state (FAVOR+: S = sum_j k'_j v_j^T and z = sum_j k'_j, constant size; exact: a
key/value cache), so ``step`` equals the last row of ``forward`` on the prefix.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from protein_performer.model.attention import KVCache, SoftmaxAttention
from protein_performer.model.favor import FavorAttention, FavorState
from protein_performer.model.rotary import apply_rotary, rotary_tables

log = logging.getLogger(__name__)
POSITION_QK_STD = 0.1  # initial scale of positional queries and keys (qk="position")

ATTENTION_KINDS = ("favor_softmax", "favor_relu", "exact")
FAVOR_KERNELS = {"favor_softmax": "softmax", "favor_relu": "relu"}  # attention -> FavorAttention's default kernel
POSITION_KINDS = ("learned", "rotary")
QK_KINDS = ("content", "position")  # queries and keys from the hidden states, or from the position alone
INIT_KINDS = ("normal", "torch")  # N(0, 0.02) (GPT/BERT), or each layer's own PyTorch initialisation


@dataclass(frozen=True)
class PerformerConfig:
    """The architecture of a :class:`PerformerLM` (defaults: the paper's 36-layer model), checked when made.

    ``favor_kwargs`` go to every ``FavorAttention`` (e.g. ``orthogonal``, ``eps``, ``seed``);
    ``checkpointing`` recomputes each block in the backward pass (``torch.utils.checkpoint``,
    non-reentrant) to trade compute for activation memory. ``asdict(config)`` is what a
    Lightning checkpoint stores as ``hyper_parameters["model"]``.
    """

    vocab_size: int = 29
    max_len: int = 1024
    dim: int = 512
    depth: int = 36
    heads: int = 8
    dim_head: int = 64
    ff_dim: int = 1024
    dropout: float = 0.1
    attention: str = "favor_softmax"
    causal: bool = False
    nb_features: int = 256
    positions: str = "learned"
    qk: str = "content"
    init: str = "normal"
    tie_embeddings: bool = True
    checkpointing: bool = False
    favor_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "favor_kwargs", dict(self.favor_kwargs or {}))
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, got {self.positions!r}")
        if self.init not in INIT_KINDS:
            raise ValueError(f"init must be one of {INIT_KINDS}, got {self.init!r}")
        if self.qk not in QK_KINDS:
            raise ValueError(f"qk must be one of {QK_KINDS}, got {self.qk!r}")
        if self.positions == "rotary" and self.dim_head % 2:
            raise ValueError(f"rotary positions need an even dim_head, got {self.dim_head}")


def make_kernel(config: PerformerConfig, layer: int = 0) -> nn.Module:
    """The attention kernel of one layer: ``FavorAttention`` or ``SoftmaxAttention``.

    FAVOR+ layers draw their first features from ``favor_kwargs["seed"] + layer`` (different in
    every layer); training then redraws them (``training.callbacks.FeatureRedraw``).
    """
    if config.attention == "exact":
        return SoftmaxAttention(causal=config.causal)
    kw = dict(config.favor_kwargs)
    kw["seed"] = int(kw.get("seed", 0)) + layer
    kw.setdefault("kernel", FAVOR_KERNELS[config.attention])
    return FavorAttention(config.dim_head, nb_features=config.nb_features, causal=config.causal, **kw)


# ------------------------------------------------------------------------------------- blocks
class MultiHeadAttention(nn.Module):
    """Projections around one attention kernel; the kernel works on (b, h, l, d).

    ``qk="position"`` is factored attention (Bhattacharya et al. 2020): every head's queries and keys
    are learned vectors of the position alone (``q_pos``, ``k_pos``: (h, max_len, d)), so its map is
    one L x L pattern shared by all sequences (like a Potts model's couplings), the values still come
    from the residues. On sequences aligned to one family's columns it learns that family's contacts.
    """

    def __init__(self, config: PerformerConfig, kernel: nn.Module):
        super().__init__()
        dim, heads, dim_head = config.dim, config.heads, config.dim_head
        self.heads, self.dim_head, self.rotary, self.qk = heads, dim_head, config.positions == "rotary", config.qk
        inner = heads * dim_head
        if self.qk == "position":
            self.q_pos = nn.Parameter(torch.randn(heads, config.max_len, dim_head) * POSITION_QK_STD)
            self.k_pos = nn.Parameter(torch.randn(heads, config.max_len, dim_head) * POSITION_QK_STD)
        else:
            self.to_q = nn.Linear(dim, inner)
            self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Linear(inner, dim)
        self.kernel = kernel

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(b, l, h*d) -> (b, h, l, d): a projection's output as the kernels take it."""
        b, length, _ = x.shape
        return x.view(b, length, self.heads, self.dim_head).transpose(1, 2)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(b, h, l, d) -> (b, l, h*d), then the output projection ``to_out``."""
        b, h, length, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, length, h * d))

    def queries_keys(self, x: torch.Tensor, start: int = 0, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (b, h, l, d) of x (b, l, dim) at positions start.. (rotated if rotary); (1, h, l, d) if ``shared``."""
        if self.qk == "position":
            b, length = (1 if shared else x.shape[0]), x.shape[1]
            if start + length > (max_len := self.q_pos.shape[1]):
                raise ValueError(f"sequence length {start + length} > max_len {max_len} of the positional queries")
            rows = slice(start, start + length)
            q, k = (p[None, :, rows].to(x.dtype).expand(b, -1, -1, -1) for p in (self.q_pos, self.k_pos))
        else:
            q, k = self.split_heads(self.to_q(x)), self.split_heads(self.to_k(x))
        if self.rotary:
            cos, sin = rotary_tables(x.shape[1], self.dim_head, x.device, q.dtype, start=start)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.qk == "position" and isinstance(self.kernel, FavorAttention) and not self.kernel.causal):
            q, k = self.queries_keys(x)
            return self.merge_heads(self.kernel(q, k, self.split_heads(self.to_v(x)), key_padding_mask))
        (b, length, _), (q, k) = x.shape, self.queries_keys(x, shared=True)  # factored FAVOR+: Q', K' once
        v_t = torch.addmm(self.to_v.bias[:, None], self.to_v.weight, x.reshape(b * length, -1).t())  # head-major
        out_t = self.kernel.shared_forward(q, k, v_t.view(self.heads, self.dim_head, b, length), key_padding_mask)
        return F.linear(out_t.reshape(-1, b * length).t(), self.to_out.weight, self.to_out.bias).view(b, length, -1)

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> FavorState | KVCache:
        """The kernel's empty causal state (FAVOR+: S, z, ...; exact: the key/value cache)."""
        return self.kernel.init_state(batch, self.heads, self.dim_head, device=device, dtype=dtype)

    @torch.no_grad()
    def step(
        self, x: torch.Tensor, position: int, state: FavorState | KVCache
    ) -> tuple[torch.Tensor, FavorState | KVCache]:
        """One causal step: x (b, 1, dim) at ``position`` -> (output (b, 1, dim), new kernel state)."""
        q, k = self.queries_keys(x, start=position)
        out, state = self.kernel.step(q, k, self.split_heads(self.to_v(x)), state)  # out: (b, h, 1, d)
        return self.merge_heads(out), state

    @torch.no_grad()
    def attention_matrix(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self.queries_keys(x)
        return self.kernel.attention_matrix(q, k, key_padding_mask=key_padding_mask)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ff_dim)
        self.fc2 = nn.Linear(ff_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN residual block: ``x + drop(attn(ln1(x)))``, then ``x + drop(ff(ln2(x)))``."""

    def __init__(self, config: PerformerConfig, kernel: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = MultiHeadAttention(config, kernel)
        self.ln2 = nn.LayerNorm(config.dim)
        self.ff = FeedForward(config.dim, config.ff_dim, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), key_padding_mask))
        return x + self.dropout(self.ff(self.ln2(x)))

    @torch.no_grad()
    def step(
        self, x: torch.Tensor, position: int, state: FavorState | KVCache
    ) -> tuple[torch.Tensor, FavorState | KVCache]:
        """``forward`` on one position x (b, 1, dim) of a causal model, the attention through its state."""
        attended, state = self.attn.step(self.ln1(x), position, state)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.ln2(x))), state


@dataclass
class RecurrentState:
    """What a causal model carries from token to token (:meth:`PerformerLM.step`).

    ``position``: index of the next token to be fed (0 for an empty state). ``layers``: one state
    per block; FAVOR+ layers hold a ``FavorState`` (S (b, h, m, d), z (b, h, m), the stabilizer:
    constant size), exact layers a ``KVCache`` (k, v (b, h, t, d): grows).
    """

    position: int = 0
    layers: list[FavorState | KVCache] = field(default_factory=list)

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant in ``position`` for FAVOR+ layers)."""
        return sum(layer.nbytes() for layer in self.layers)


@dataclass
class BackboneKeys:
    """What :meth:`PerformerLM.load_backbone` left aside: the feature-buffer keys this model has and
    the weights lacked (``missing``: it keeps its own), and those the weights had and it lacks."""

    missing: list[str]
    unexpected: list[str]


# ------------------------------------------------------------------------------------- model
class PerformerLM(nn.Module):
    """Protein language model of the architecture ``config``; UNI when ``config.causal``, BID (masked LM) otherwise.

    ``PerformerLM(PerformerConfig(depth=4, attention="exact"))``. The config's fields may instead be
    given as keywords (never both): that is how Hydra builds it from ``conf/model``
    (``_target_: protein_performer.model.performer.PerformerLM``, the config's fields as keys).
    """

    def __init__(self, config: PerformerConfig | None = None, **fields: Any):
        super().__init__()
        if config is not None and fields:
            raise TypeError(
                f"PerformerLM takes a PerformerConfig or its fields as keywords, not both: {sorted(fields)}"
            )
        config = PerformerConfig(**fields) if config is None else config
        self.config = config
        self.checkpointing = config.checkpointing
        self.token_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim) if config.positions == "learned" else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, make_kernel(config, i)) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size)
        if config.init == "normal":
            self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_emb.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- forward
    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token (+ learned position) embeddings of tokens (b, l) at positions start.. -> (b, l, dim)."""
        length = tokens.shape[1]
        if self.pos_emb is not None and start + length > self.config.max_len:
            raise ValueError(
                f"sequence length {start + length} > max_len {self.config.max_len} of the learned positions"
            )
        x = self.token_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + length, device=tokens.device))
        return self.emb_dropout(x)

    def forward(
        self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None, return_attention: bool = False
    ) -> dict[str, Any]:
        """tokens: (b, l) long; key_padding_mask: (b, l) bool, True = padding.

        Returns ``dict(logits=(b, l, vocab))`` plus ``attentions`` (a list of (b, h, l, l), one per
        layer) when ``return_attention``.
        """
        attentions = []
        for layer, x in enumerate(self.hidden_states(tokens, key_padding_mask)):
            if return_attention and layer < len(self.blocks):
                attentions.append(self.layer_attention(layer, x, key_padding_mask))
        out: dict[str, Any] = {"logits": self.lm_head(x)}
        if return_attention:
            out["attentions"] = attentions
        return out

    def hidden_states(
        self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        """The hidden states (b, l, dim) entering each block, then the final representation (after
        the last LayerNorm): ``depth + 1`` tensors, each computed when the one before it is taken."""
        x = self.embed(tokens)
        for block in self.blocks:
            yield x
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, key_padding_mask, use_reentrant=False)
            else:
                x = block(x, key_padding_mask)
        yield self.norm(x)

    def layer_attention(
        self, layer: int, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Layer ``layer``'s maps (b, h, l, l) float32 from the hidden states ``x`` entering it: its
        kernel's ``attention_matrix`` on the layer's own queries and keys."""
        block = self.blocks[layer]
        return block.attn.attention_matrix(block.ln1(x), key_padding_mask)

    def representations(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(b, l, dim): the final representation (after the last LayerNorm) without the LM head."""
        return deque(self.hidden_states(tokens, key_padding_mask), maxlen=1)[0]  # one layer held at a time

    def layer_inputs(
        self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None, layers: Iterable[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(layer, hidden states entering it)`` for ``layers`` (default: all), in order; no block after the last."""
        wanted = sorted({int(i) for i in (range(len(self.blocks)) if layers is None else layers)})
        if wanted and not 0 <= wanted[0] <= wanted[-1] < len(self.blocks):
            raise ValueError(f"layers {wanted} outside 0..{len(self.blocks) - 1}")
        for layer, x in zip(range(wanted[-1] + 1 if wanted else 0), self.hidden_states(tokens, key_padding_mask)):
            if layer in wanted:
                yield layer, x

    @torch.no_grad()
    def attention_maps(
        self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None, layers: Iterable[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(layer, maps (b, h, l, l) float32)`` for ``layers`` (default: all), in order and one
        layer at a time (the maps of ``forward(return_attention=True)``; features: ``layer_features``)."""
        for layer, x in self.layer_inputs(tokens, key_padding_mask, layers):
            yield layer, self.layer_attention(layer, x, key_padding_mask)

    # ---------------------------------------------------------------- token by token (causal)
    def check_can_step(self) -> None:
        """Raise unless this is a causal model whose kernels can step (FAVOR+ or exact)."""
        if not self.config.causal:
            raise ValueError("recurrent generation needs a causal (UNI) model; this one has causal=False")
        for i, kernel in self.attention_kernels():
            if not (callable(getattr(kernel, "step", None)) and callable(getattr(kernel, "init_state", None))):
                raise TypeError(f"layer {i}: cannot step a {type(kernel).__name__} kernel (FAVOR+ or exact only)")
            if not kernel.causal:
                raise ValueError(f"layer {i}: the attention kernel is not causal")

    def init_state(self, batch: int, device: torch.device | str | None = None) -> RecurrentState:
        """An empty state for ``batch`` sequences (nothing fed yet); FAVOR+ states in float32 or wider."""
        self.check_can_step()
        param = next(self.parameters())
        device = param.device if device is None else device
        dtype = torch.promote_types(param.dtype, torch.float32)
        return RecurrentState(0, [block.attn.init_state(batch, device, dtype) for block in self.blocks])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """Feed one token per sequence, tokens (b,) long, at position ``state.position``.

        Returns the logits (b, vocab) for the next position and the new state: the last row of
        ``forward`` on everything fed so far, at O(1) cost per token for FAVOR+ layers. Dropout is
        the caller's business (use ``eval()``).
        """
        position = state.position
        if self.pos_emb is not None and position >= self.config.max_len:
            raise ValueError(f"position {position} >= max_len {self.config.max_len} of the learned positions")
        x = self.embed(tokens.view(-1, 1), start=position)  # (b, 1, dim)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block.step(x, position, layer_state)
            layers.append(layer_state)
        return self.lm_head(self.norm(x))[:, 0], RecurrentState(position + 1, layers)

    # ---------------------------------------------------------------- random features
    def attention_kernels(self) -> Iterator[tuple[int, nn.Module]]:
        for i, block in enumerate(self.blocks):
            yield i, block.attn.kernel

    def redraw_features(self, seed_fn: Callable[[int], int]) -> None:
        """Redraw every layer's random features: layer ``i`` from ``seed_fn(i)`` (no-op for exact)."""
        for i, kernel in self.attention_kernels():
            kernel.redraw(int(seed_fn(i)))

    def feature_buffer_names(self) -> set[str]:
        """State-dict keys that belong to the attention kernels (random features, not weights)."""
        return {f"blocks.{i}.attn.kernel.{n}" for i, k in self.attention_kernels() for n, _ in k.named_buffers()}

    # ---------------------------------------------------------------- weights
    def load_backbone(self, state_dict: dict[str, torch.Tensor]) -> BackboneKeys:
        """Load the weights of a model of the same shape but maybe another attention kind.

        Every parameter must match; only the kernels' random-feature buffers may be missing
        (exact -> FAVOR+: this model keeps its own features) or unexpected (FAVOR+ -> exact).
        Returns those missing and unexpected feature-buffer keys.
        """
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        result = self.load_state_dict(state_dict, strict=False)
        kernel_keys = lambda k: ".attn.kernel." in k  # noqa: E731
        bad_missing = [k for k in result.missing_keys if not kernel_keys(k)]
        bad_unexpected = [k for k in result.unexpected_keys if not kernel_keys(k)]
        if bad_missing or bad_unexpected:
            raise RuntimeError(
                f"weights do not fit this PerformerLM: missing {bad_missing[:5]} unexpected {bad_unexpected[:5]} "
                f"(only attention-kernel buffers may differ)"
            )
        log.info(
            "loaded backbone weights; %d kernel buffers kept, %d ignored",
            len(result.missing_keys),
            len(result.unexpected_keys),
        )
        return BackboneKeys(list(result.missing_keys), list(result.unexpected_keys))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            n -= self.token_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def summary(self) -> dict[str, Any]:
        """Parameter counts and the configuration, for the logger."""
        return {
            "params_total": self.num_parameters(),
            "params_non_embedding": self.num_parameters(exclude_embeddings=True),
            "params_per_block": sum(p.numel() for p in self.blocks[0].parameters()) if len(self.blocks) else 0,
            **{f"config/{k}": v for k, v in asdict(self.config).items() if k != "favor_kwargs"},
        }
