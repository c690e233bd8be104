"""FAVOR+: fast attention via positive orthogonal random features (Choromanski et al., ICLR 2021).

    Att(Q, K, V) ~ D^-1 (Q' ((K')^T V)),  D = diag(Q' ((K')^T 1)),  Q' = phi(Q d^-1/4), K' = phi(K d^-1/4)

One public entry, ``FavorAttention`` (``module.py``, a ``FeatureMap`` that attends); the files are split the way kernel libraries
split them, each opening with the equations it implements:

    features.py        the projection W (orthogonal blocks) and the feature maps phi:
                       softmax exp(w^T x - |x|^2/2) / sqrt(m), hyperbolic, trigonometric, relu(w^T x) + eps;
                       ``FeatureMap`` owns W and applies them for every path below
    causal.py          D^-1 (Q' ((K')^T V)) and the chunked causal product with its backward (batched)
    scan.py            the same with the features fused into a scan over blocks, recomputed in backward
    triton_kernels.py  the CUDA kernels (Triton) for the same, features fused; triton_ops.py runs them
    fla_backend.py     flash-linear-attention's chunked kernels on our feature maps (optional)
    probe.py           checks a fast path's output and gradients on the device before it is trusted
    recurrent.py       decoding: the state ``FavorState`` (S, z, running stabilizer) and one step
    reference.py       the O(L^2) explicit definitions that tests (and readers) check everything against

Notation and shapes: b batch, h heads, l length, d head dim, m features, e value dim (+1 when a
column of ones rides along so that the denominator D is computed with the numerator).

Numerics:
- q and k are scaled by d^-1/4 each before the feature map (softmax's 1/sqrt(d)).
- Softmax features subtract a detached stabilizer inside the exp: per row the max over features
  for queries (cancels in D^-1); for keys one max over all real keys (bidirectional) or, causally,
  the running max c_i = max_{j<=i} s_j, so position i never depends on a later key and equals what
  ``step`` gives token by token. Every chunked factor exp(s_j - c_i) is split into factors <= 1.
- Feature maps and every sum run in float32, also under bf16/fp16 autocast; outputs are cast back.
- Padded keys get zero features and are left out of every max.
"""

from protein_performer.model.favor.causal import causal_linear_attention, causal_product, linear_attention
from protein_performer.model.favor.features import (
    FUSED_KINDS,
    KERNELS,
    NORMS,
    FeatureMap,
    causal_stabilizer,
    draw_projection,
    key_stabilizer,
    per_key_features,
    relu_kernel,
    softmax_kernel,
    softmax_logits,
    trig_kernel,
)
from protein_performer.model.favor.module import FavorAttention
from protein_performer.model.favor.recurrent import FavorState

__all__ = [
    "FUSED_KINDS",
    "KERNELS",
    "NORMS",
    "FavorAttention",
    "FavorState",
    "FeatureMap",
    "causal_linear_attention",
    "causal_product",
    "causal_stabilizer",
    "draw_projection",
    "key_stabilizer",
    "linear_attention",
    "per_key_features",
    "relu_kernel",
    "softmax_kernel",
    "softmax_logits",
    "trig_kernel",
]
