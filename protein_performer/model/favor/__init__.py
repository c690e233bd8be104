"""FAVOR+: fast attention via positive orthogonal random features (Choromanski et al., ICLR 2021).

Everything about Performer attention lives in this file, one small pure function per equation:

    draw_projection          the random features w_1..w_m (orthogonal blocks, chi / sqrt(d) norms)
    softmax_kernel           phi(x) = exp(w^T x - |x|^2/2) / sqrt(m)   (FAVOR+, positive, + hyperbolic)
    trig_kernel              phi(x) = exp(|x|^2/2) / sqrt(m) [sin(w^T x), cos(w^T x)]  (comparison only)
    relu_kernel              phi(x) = relu(w^T x) + eps                 (Performer-ReLU)
    linear_attention         D^-1 (Q' ((K')^T V))                       (bidirectional)
    causal_linear_attention  out_i = q'_i S_i / q'_i z_i                (unidirectional, prefix sums)

Notation and shapes: ``b`` batch, ``h`` heads, ``l`` length, ``d`` head dim, ``m`` features,
``e`` value dim (+1 when a column of ones is appended so that the denominator D rides along with
the numerator). The causal kernel works on chunked tensors (B n, C, f): B = b h, n = ceil(l / C)
chunks of C positions.

Numerics (see PAPER.md, "FAVOR+ in one page"):
- q and k are scaled by d^-1/4 each before the feature map (that is softmax's 1/sqrt(d)).
- Softmax features subtract a stabilizer inside the exp: the max over features per row for
  queries (cancels in D^-1), one max per (batch, head) over all real keys and features for keys.
  Both are detached: they are constants, not functions to differentiate. Padded keys are left out
  of the key max, so padding changes nothing for the real tokens.
- Feature maps and every sum run in float32, also under bf16/fp16 autocast; the output is cast
  back to the input dtype.
- Causal attention never materialises an L x m x d prefix tensor: inside a chunk of C positions it
  is a masked (Q' K'^T) V, across chunks an m x e state is summed over the previous chunks. The
  backward pass (``_CausalProduct``) rebuilds the states from the saved q', k', v: forward for
  dQ', in reverse (suffix sums, from the last chunk) for dK' and dV.

Causal stabilizer: the key stabilizer of position i is the running max c_i = max_{j<=i} s_j of the
per-key maxima s_j (``causal_stabilizer``), never a max over later keys. So out_i is exactly the
bidirectional output over tokens 0..i, eps floor included, and equals what recurrent decoding
(``step``) gives. The released JAX code uses one max over the whole sequence for causal attention
too, which lets later keys shift earlier outputs through the eps floor (8.6e-3 in logits at
L = 8192 in study 5 before this change; up to 0.46 in the outputs of early positions for random
inputs at L = 8192). In the chunked kernel the factor exp(s_j - c_i) is
split into three factors that are each <= 1 (per key, per chunk pair, per query), so nothing can
overflow: see ``_ChunkScales``.
"""

from protein_performer.model.favor.causal import causal_linear_attention, causal_product, linear_attention
from protein_performer.model.favor.features import (
    KERNELS,
    NORMS,
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

__all__ = [
    "KERNELS", "NORMS", "FavorAttention", "causal_linear_attention", "causal_product", "causal_stabilizer",
    "draw_projection", "key_stabilizer", "linear_attention", "per_key_features", "relu_kernel",
    "softmax_kernel", "softmax_logits", "trig_kernel",
]
