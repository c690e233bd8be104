"""Causal FAVOR+ through flash-linear-attention's chunked kernels (PyPI ``fla-core`` 0.6.x, MIT).

fla's kernels run wherever Triton runs (CUDA; the CPU only under ``TRITON_INTERPRET=1``) and are
imported lazily, so this package works without fla. fla has no feature maps of its own for FAVOR+:
our features (``features.py``) are computed in float32 and handed to fla in its (b, t, h, m) layout.
fla has no bidirectional op (its linear-attention kernels are all causal); bidirectional FAVOR+ is
two large matmuls, D^-1 Q' (K'^T [V 1]) (``causal.linear_attention``), which needs no kernel.

``favor_causal_fla`` keeps our semantics exactly (the same contract as
``causal.causal_linear_attention``). With per-key scales s_j and the causal stabilizer
c_i = max_{j<=i} s_j (the running max over real keys):

    out_i = N_i / D_i,  [N_i | D_i] = sum_{j<=i} (q'_i . k^_j exp(s_j - c_i) + f A_i) [v_j | 1],

A_i = sum_m q'_i (the eps floor f of every key feature, never scaled). fla's gated linear
attention (``fla.ops.simple_gla.chunk_simple_gla``, the kernels under ``chunk_linear_attn``)
computes o_i = q_i . S_i with S_i = exp(g_i) S_{i-1} + k_i v_i^T. We feed it
k_i = k^_i exp(s_i - c_i) (a factor <= 1), v = [V 1] and the gate g_i = c_{i-1} - c_i <= 0:
then S_i = sum_{j<=i} exp(c_j - c_i) exp(s_j - c_j) k^_j [v_j 1]^T, which is exactly the term
exp(s_j - c_i) above, the running-max rescaling of recurrent decoding (``FavorAttention.step``).
Every factor is <= 1 (fla evaluates exp of differences of the within-chunk cumulative gate, also
<= 1 for j <= i; the j > i entries are discarded with ``tl.where``), so nothing overflows however
fast the stabilizer grows; the inputs of position i depend on tokens 0..i only, so no later token
can change an earlier output, not even in rounding (the test checks it bitwise). The floor
f A_i cumsum([v 1])_i is added outside fla (L x (d + 1) numbers), and we divide ourselves (a zero
denominator, a query with no real key, gives 0), with ``normalize=False``. Price: fla tiles V in
blocks of 32-64 columns, so d + 1 = 65 costs one more V block than d = 64 in the V-tiled kernels
(the benchmark's ``favor_softmax_fla_normalized`` row, V = d and no gate, measures the difference).

How this differs from ``chunk_linear_attn(q, k, v, scale=1.0, normalize=True)`` (kept as
``favor_causal_fla_normalized``, for comparison):
- fla's normalisation divides by q_i . z_i + 1e-10, z_i = sum_{j<=i} k_j (a plain cumsum of the key
  features, L x m numbers kept for backward). The 1e-10 is an absolute floor: z = 0 (no real key)
  gives 0 / 1e-10 = 0, like our guard, but a real denominator below ~1e-6 is biased by 1e-10 / D.
- It has no gate, so the key features must carry one stabilizer for the whole sequence per
  (batch, head): k'_j = m^-1/2 (exp(w^T k_j - |k_j|^2/2 - C) + eps), C = the max over all real keys
  and features (``features.key_stabilizer``, the released JAX semantics). In exact arithmetic and
  without eps, exp(-C) is a common factor of N_i and D_i and cancels. Numerically it does not:
  (1) the eps floor is not multiplied by exp(-C), so a later key that raises C raises the floor's
  relative weight in every earlier output (documented in ``__init__``: up to 0.46 in early
  outputs at L = 8192 for random inputs); (2) the 1e-10 of the denominator: D_i is scaled by
  exp(c_i - C), so an early query is biased by 1e-10 exp(C - c_i) / D_i, which a later key
  controls; (3) an early key whose s_j < C - 87 underflows to 0 in float32 (or to the eps floor),
  erasing it from every output; (4) any change of C rescales every operand, so outputs change at
  the rounding level of the kernels' dots (TF32 on GPU for float32 inputs: ~1e-3 relative).
  So a per-sequence max leaks future tokens into past outputs: through the eps floor by design,
  through (2)-(4) numerically. In tests/model/test_favor_fla.py one later key that raises C by ~9 moves
  earlier outputs (values ~N(0, 1)) by up to 0.76 with eps = 1e-6 and still by 0.038 with eps = 0
  (through the 1e-10: q'.z of early queries falls to ~1e-8); ``favor_causal_fla`` moves them by 0.

Precision: fla's ``tl.dot`` calls use Triton's default input precision, TF32 for float32 inputs on
NVIDIA GPUs (set ``TRITON_F32_DEFAULT=ieee`` for full float32); the interpreter computes them in
float32. Shapes: ours are (b, h, l, m); fla's (b, l, h, m); the transposes are copied to contiguous
tensors by fla (one extra L x m copy of q' and k' each).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

FLA_REQUIREMENT = "fla-core>=0.6,<0.7"


class _LoopIndex(int):
    """A ``range`` loop index with the no-op ``.to`` that compiled Triton gives it."""

    def to(self, *args, **kwargs):
        return self


def _loop_range(*args):
    return map(_LoopIndex, range(*args))


@contextlib.contextmanager
def interpreter_workarounds():
    """What fla-core 0.6.0 with triton 3.9 needs under ``TRITON_INTERPRET=1`` (the CPU), undone on
    exit; compiled kernels need neither: (1) autotuning benchmarks its configs on a GPU driver, which
    the interpreter has not: keep only the first config; (2) fla's kernels call ``.to(tl.int64)`` on
    the index of a Python ``range`` loop, which the compiler turns into a tensor but the interpreter
    leaves a Python int: give those indices a no-op ``.to``."""
    import fla.ops.linear_attn  # noqa: F401  (import every kernel module before patching)
    import fla.ops.simple_gla  # noqa: F401
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    mods = [mod for name, mod in list(sys.modules.items()) if name.startswith("fla.") and mod is not None]
    saved = {mod: vars(mod).get("range", _loop_range) for mod in mods}
    Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
    for mod in mods:
        mod.range = _loop_range
    try:
        yield
    finally:
        Autotuner.prune_configs = prune
        for mod, old in saved.items():
            if old is _loop_range:
                del mod.range
            else:
                mod.range = old


@functools.cache
def fla_available() -> bool:
    """Whether fla-core's linear-attention kernels import (needs fla-core and triton)."""
    try:
        import fla.ops.simple_gla  # noqa: F401
    except ImportError:
        return False
    return True


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """(b, h, l, d) -> (b, h, l, d + 1): V with a column of ones, so that D rides along with N."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _divide(out_ext: torch.Tensor) -> torch.Tensor:
    """[N | D] -> N / D; a zero denominator (a query that sees no real key) gives 0, not NaN."""
    num, den = out_ext[..., :-1], out_ext[..., -1:]
    return num / torch.where(den == 0, torch.ones_like(den), den)


def _to_fla(x: torch.Tensor) -> torch.Tensor:
    """(b, h, l, f) -> (b, l, h, f), fla's layout. fla 0.6's backward asserts an even K and V for
    16-bit inputs (its note: Triton miscompiles odd 16-bit tails), so those get a zero column."""
    if x.element_size() == 2 and x.shape[-1] % 2:
        x = torch.nn.functional.pad(x, (0, 1))
    return x.transpose(1, 2)


def gate_stabilizer(key_scale: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The running max c_i = max_{j<=i, j real} s_j, (b, h, l), detached and non-decreasing everywhere.

    Equal to ``causal_stabilizer`` from the first real key on; before it (where every key has zero
    features, so the value does not matter) it takes the first real key's scale instead of 0, so
    that the gate c_{i-1} - c_i is <= 0 at every position and exp(gate) never overflows. A
    (batch, head) with no real key gets 0.
    """
    s = key_scale.detach()
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    c = torch.cummax(s, dim=-1).values
    c = torch.where(torch.isfinite(c), c, torch.full_like(c, float("inf")))
    c = torch.cummin(c.flip(-1), dim=-1).values.flip(-1)  # leading +inf -> the first finite value
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def favor_causal_fla(
    q_prime: torch.Tensor,
    k_prime: torch.Tensor,
    v: torch.Tensor,
    key_scale: torch.Tensor | None = None,
    floor: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal FAVOR+ out_i = q'_i S_i / q'_i z_i on fla's gated chunked kernels (see the module docstring).

    The contract of ``causal.causal_linear_attention`` (without ``chunk``: fla's is 64):
    q_prime, k_prime: (b, h, l, m), float32 (TF32 dots on GPU by default, see above);
    v: (b, h, l, d); key_scale: (b, h, l) per-key scales s from ``per_key_features`` (k_prime is
    then phi_hat at each key's own scale), or None for features used as they are; floor: the eps
    floor f of every key feature (``FavorAttention.feature_floor()``), never scaled; key_padding_mask
    (b, l), True = padded: those keys must already have zero features. Returns (b, h, l, d) in
    q_prime's dtype (float16 / bfloat16 features run fla's dots in that precision, the floor and the
    division in float32). Gradients flow to q_prime, k_prime and v (fla's hand-written backward).
    """
    from fla.ops.simple_gla import chunk_simple_gla

    v_ext = _with_ones(v.to(q_prime.dtype))
    if key_padding_mask is not None:  # padded keys: no value, no floor, no count
        v_ext = v_ext.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    gate = None
    keys = k_prime
    if key_scale is not None:
        c = gate_stabilizer(key_scale, key_padding_mask)
        # exp(s_j - c_j) <= 1 for real keys; the clamp keeps padded keys (zero features) finite
        keys = (k_prime * (key_scale.detach() - c).clamp(max=0.0).exp().unsqueeze(-1)).to(k_prime.dtype)
        gate = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1] - c[..., 1:]], dim=-1)  # c_{i-1} - c_i
        gate = gate.transpose(1, 2).contiguous()  # (b, l, h)
    out_ext, _ = chunk_simple_gla(_to_fla(q_prime), _to_fla(keys), _to_fla(v_ext), g=gate, scale=1.0)
    wide = torch.promote_types(q_prime.dtype, torch.float32)  # the epilogue in float32 at least
    out_ext = out_ext.transpose(1, 2)[..., : v_ext.shape[-1]].to(wide)  # (b, h, l, d + 1)
    if floor:  # f A_i sum_{j<=i} [v_j 1]: the floor of every key feature, at query i's scale
        a_sum = q_prime.to(wide).sum(dim=-1, keepdim=True)
        out_ext = out_ext + floor * a_sum * torch.cumsum(v_ext.to(wide), dim=-2)
    return _divide(out_ext).to(q_prime.dtype)


def favor_causal_fla_normalized(q_prime: torch.Tensor, k_prime: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``chunk_linear_attn(q', k', v, scale=1.0, normalize=True)`` in our layout: out_i = q'_i S_i / (q'_i z_i + 1e-10).

    For key features with one stabilizer per (batch, head) and the eps floor inside them
    (``FavorAttention.features(k, False)``): the released JAX semantics, which differ from ours
    through the floor and numerically (module docstring). (b, h, l, m), (b, h, l, d) -> (b, h, l, d).
    """
    from fla.ops.linear_attn import chunk_linear_attn

    out, _ = chunk_linear_attn(
        _to_fla(q_prime), _to_fla(k_prime), _to_fla(v.to(q_prime.dtype)), scale=1.0, normalize=True
    )
    return out.transpose(1, 2)[..., : v.shape[-1]]
