"""Attention-Potts: a Potts model whose couplings are Performer attention maps, fitted by
pseudo-likelihood on a family's alignment (the family-contacts tool's default model, issue 21).

On an alignment of N rows x L columns over q = 21 states (the 20 amino acids of ``STANDARD_AA`` as
0-19; 20 for a gap and for B O U X Z, as plmDCA reads them) the model is

    P(x_i = a | x_-i) = softmax_a( h_i(a) + sum_{j != i} J_ij(a, x_j) ),
    J_ij(a, b) = sum_h A_h(i, j) W_h(a, b),

one layer of factored attention written as a Potts model (Bhattacharya et al. 2020, "Single layers
of attention suffice to predict protein contacts"): each head h has learned queries and keys per
column (``q_pos``, ``k_pos``: (H, L, d)) and one q x q value matrix W_h; its map A_h is Performer
attention over the columns, ``phi(q_i)^T phi(k_j) / sum_{j' != i} phi(q_i)^T phi(k_j')`` with the
FAVOR+ features phi of :class:`~protein_performer.model.favor.features.FeatureMap` (Performer-ReLU by
default, positive softmax features with ``attention="favor_softmax"``; ``"exact"`` is softmax
attention), the diagonal left out so that position i is predicted from the others only (the
pseudo-likelihood). Because the one-hot inputs enter linearly, the logits of a batch are one matrix
product with J (L q x L q): the cost of a step does not grow with the number of heads, which is what
lets the model have 128 of them (Bhattacharya et al. find contact precision rising with the heads
towards the Potts model's).

Loss (divided by N_eff = sum_n w_n, the DCA weights of :func:`.msa.sequence_weights`):

    sum_n w_n sum_i -log P(x_ni | x_n,-i) + lambda_h |h|^2 + lambda_J sum_{i<j} |J_ij|^2

with plmDCA's L2 terms as ``benchmarks/potts.py`` has them (lambda_h = 0.01, lambda_J = 0.01 (L - 1)
(q - 1), GREMLIN's scaling), the pair term computed from the heads' Gram matrices (no L x L x q x q
array). Fitted by Adam on batches drawn uniformly (the weights are in the loss) for a time budget.
Contact score: as the Potts model's, the Frobenius norm of J_ij over the 20 amino acids, symmetrized
(:meth:`AttentionPotts.coupling_norms`), then APC (``analysis.contacts.potts``, the family-contacts tool).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from protein_performer.data.tokenizer import STANDARD_AA, Tokenizer
from protein_performer.model.favor.features import FeatureMap
from protein_performer.outputs import atomic_output

log = logging.getLogger(__name__)

Q = 21  # states: the 20 amino acids, then gap (and B O U X Z)
AMINO = 20
LAMBDA_H = 0.01
LAMBDA_J = 0.01  # times (L - 1)(q - 1)
ATTENTIONS = ("favor_relu", "favor_softmax", "exact")
FORMAT = "attention_potts"
QK_STD = 0.1  # initial scale of the positional queries and keys
VALUE_STD = 0.01  # initial scale of the value matrices


def potts_states(tokens: np.ndarray) -> np.ndarray:
    """(N, L) int64 states 0-20 from tokenizer ids: the 20 amino acids in ``STANDARD_AA`` order, 20
    for everything else (the alignment's gap, X and the ambiguous letters)."""
    tokens = np.asarray(tokens).astype(np.int64)
    first = Tokenizer.mask_id + 1
    aa = (tokens >= first) & (tokens < first + len(STANDARD_AA))
    return np.where(aa, tokens - first, AMINO)


def pair_penalty(length: int, q: int = Q, scale: float = LAMBDA_J) -> float:
    """lambda_J = scale (L - 1)(q - 1), GREMLIN's convention."""
    return scale * (length - 1) * (q - 1)


@dataclass(frozen=True)
class AttentionPottsConfig:
    """The model's shape: ``length`` columns, ``heads`` maps of queries and keys of ``dim_head``,
    ``attention`` one of :data:`ATTENTIONS` with ``nb_features`` FAVOR+ features, ``seed`` of the
    initial weights and of the features."""

    length: int
    heads: int = 128
    dim_head: int = 32
    attention: str = "favor_relu"
    nb_features: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if min(self.length, self.heads, self.dim_head, self.nb_features) < 1:
            raise ValueError(f"length, heads, dim_head and nb_features must be >= 1: {self}")
        if self.length < 2:
            raise ValueError(f"a Potts model needs at least 2 columns, got {self.length}")


class AttentionPotts(nn.Module):
    """The model of the module docstring."""

    def __init__(self, config: AttentionPottsConfig):
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(int(config.seed))
        h, length, d = config.heads, config.length, config.dim_head
        self.q_pos = nn.Parameter(torch.randn(h, length, d, generator=g) * QK_STD)
        self.k_pos = nn.Parameter(torch.randn(h, length, d, generator=g) * QK_STD)
        self.values = nn.Parameter(torch.randn(h, Q, Q, generator=g) * VALUE_STD)
        self.fields = nn.Parameter(torch.zeros(length, Q))
        kind = config.attention.removeprefix("favor_")
        self.features = (
            None if config.attention == "exact" else FeatureMap(d, config.nb_features, kind, seed=config.seed)
        )
        self.register_buffer("off_diagonal", 1.0 - torch.eye(length), persistent=False)

    def attention(self) -> torch.Tensor:
        """(H, L, L): every head's map over the columns, rows summing to 1, zero diagonal."""
        if self.features is None:
            scores = torch.einsum("hid,hjd->hij", self.q_pos, self.k_pos) / math.sqrt(self.config.dim_head)
            return scores.masked_fill(self.off_diagonal == 0, float("-inf")).softmax(-1)
        fq = self.features.features(self.q_pos[None], is_query=True)[0]  # (H, L, m)
        fk = self.features.features(self.k_pos[None], is_query=False)[0]
        a = torch.einsum("him,hjm->hij", fq, fk) * self.off_diagonal
        return a / a.sum(-1, keepdim=True)

    def couplings(self, attention: torch.Tensor | None = None) -> torch.Tensor:
        """J (L, q, L, q): J[i, a, j, b] = sum_h A_h(i, j) W_h(a, b); zero for i = j."""
        a = self.attention() if attention is None else attention
        return torch.einsum("hij,hab->iajb", a, self.values)

    def forward(self, states: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n, L, q) of P(x_i | x_-i) for states (n, L) int64."""
        n, length = states.shape
        j = self.couplings(attention).reshape(length * Q, length * Q)
        onehot = torch.nn.functional.one_hot(states, Q).to(j.dtype).reshape(n, length * Q)
        return self.fields + (onehot @ j.T).view(n, length, Q)

    def neg_log_pl(self, states: torch.Tensor, weights: torch.Tensor, attention: torch.Tensor | None = None):
        """sum_n w_n sum_i -log P(x_ni | x_n,-i) of states (n, L) with weights (n,)."""
        logp = torch.log_softmax(self(states, attention), -1).gather(-1, states[..., None]).squeeze(-1)
        return -(weights[:, None] * logp).sum()

    def penalty(self, attention: torch.Tensor | None = None) -> torch.Tensor:
        """lambda_h |h|^2 + lambda_J sum_{i<j} |J_ij|^2, the pair term from the heads' Gram matrices."""
        a = self.attention() if attention is None else attention
        flat_a, flat_w = a.reshape(a.shape[0], -1), self.values.reshape(a.shape[0], -1)
        pairs = ((flat_a @ flat_a.T) * (flat_w @ flat_w.T)).sum()  # sum_ij |J_ij|^2, both orders
        return pair_penalty(self.config.length) * 0.5 * pairs + LAMBDA_H * (self.fields**2).sum()

    def loss(self, states: torch.Tensor, weights: torch.Tensor, n_eff: float | None = None) -> torch.Tensor:
        """The module docstring's loss divided by N_eff, its data term estimated from the batch
        ``states`` (n, L) with weights (n,) (``n_eff``: the whole alignment's, default the batch's)."""
        a = self.attention()
        n_eff = float(weights.sum()) if n_eff is None else float(n_eff)
        return self.neg_log_pl(states, weights, a) / weights.sum() + self.penalty(a) / n_eff

    @torch.no_grad()
    def coupling_norms(self) -> np.ndarray:
        """(L, L) float64: the symmetrized Frobenius norms of J_ij over the 20 amino acids (before APC)."""
        return coupling_norms(self.attention().double().numpy(), self.values[:, :AMINO, :AMINO].double().numpy())


def coupling_norms(attentions: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """(L, L) float64: ``|J_ij|_F + |J_ji|_F`` (zero diagonal) of J_ij = sum_h A_h(i, j) M_h, from
    ``attentions`` (heads, L, L) and ``matrices`` (heads, q, q). With the heads' Gram matrix
    G_hk = <M_h, M_k>, |J_ij|_F = sqrt(a_ij^T G a_ij) for a_ij = (A_h(i, j))_h: no (L, L, q, q) array."""
    a = np.asarray(attentions, dtype=np.float64)
    heads, length, _ = a.shape
    m = np.asarray(matrices, dtype=np.float64).reshape(heads, -1)
    flat = a.reshape(heads, -1)
    norms = np.sqrt(np.maximum(np.einsum("hn,hk,kn->n", flat, m @ m.T, flat), 0.0)).reshape(length, length)
    sym = norms + norms.T
    np.fill_diagonal(sym, 0.0)
    return sym


def fit(
    model: AttentionPotts,
    states: np.ndarray,
    weights: np.ndarray,
    seconds: float,
    max_steps: int | None = None,
    batch_size: int = 512,
    lr: float = 0.02,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Adam on batches of ``batch_size`` rows drawn uniformly (seeded) until ``seconds`` have passed
    (or ``max_steps``); a progress bar shows the time left. Returns ``{"steps", "seconds", "loss"}``
    (``loss``: the whole alignment's at the end)."""
    from tqdm.auto import tqdm

    x = torch.as_tensor(np.asarray(states), dtype=torch.int64)
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != model.config.length or x.shape[0] != w.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"states {tuple(x.shape)} and weights {tuple(w.shape)} do not fit a model of {model.config.length} columns"
        )
    n_eff = float(w.sum())
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{remaining} left{postfix}]"
    bar = tqdm(total=round(seconds), desc="fitting", bar_format=fmt, disable=not progress, mininterval=1.0)
    start, steps, batch = time.perf_counter(), 0, min(batch_size, x.shape[0])
    model.train()
    while (max_steps is None or steps < max_steps) and time.perf_counter() - start < seconds:
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x[idx], w[idx], n_eff)
        loss.backward()
        opt.step()
        steps += 1
        bar.update(min(time.perf_counter() - start, seconds) - bar.n)
        if steps % 50 == 0:
            bar.set_postfix(step=steps, loss=f"{loss.item():.2f}", refresh=False)
            log.debug("step %d: loss %.4f", steps, loss.item())
    bar.close()
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        a = model.attention()
        data = sum(float(model.neg_log_pl(x[i : i + 4096], w[i : i + 4096], a)) for i in range(0, len(x), 4096))
        total = (data + float(model.penalty(a))) / n_eff
    log.info("attention-Potts: %d steps in %.1f s, loss / N_eff %.4f", steps, elapsed, total)
    return {"steps": steps, "seconds": round(elapsed, 1), "loss": round(total, 4)}


def save(model: AttentionPotts, path: str | Path, **extra) -> Path:
    """Write the model (its config, weights and ``extra``: the query and its columns) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "config": asdict(model.config), "state_dict": model.state_dict(), **extra}
    with atomic_output(path) as tmp:
        torch.save(record, tmp)
    return path


def load(path: str | Path) -> tuple[AttentionPotts, dict]:
    """The model written by :func:`save` and the record's other entries."""
    record = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not an attention-Potts model (written by attention_potts.save)")
    model = AttentionPotts(AttentionPottsConfig(**record["config"]))
    model.load_state_dict(record["state_dict"])
    model.eval()
    return model, {k: v for k, v in record.items() if k not in ("format", "config", "state_dict")}
