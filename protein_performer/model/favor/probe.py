"""The numerical probe of FAVOR+'s fast paths (``triton``, ``fla``) on the device that is to run them.

The Triton kernels and fla's were tested under Triton's interpreter on the CPU. On a GPU they are
compiled to code the interpreter does not model (tensor-core dot precision, 16-bit loads, races
between warps, shared-memory layouts), and a kernel that computes wrong numbers there would train
every model on wrong attention, silently. So before ``FavorAttention`` runs a fast path on a CUDA
tensor it runs this probe, once per configuration (``fast_path_ok``; the cache key is ``probe_key``:
impl, device, dtype, d, m, kernel, causal, chunk, eps), and compares numbers, not just launches:

- inputs (``probe_inputs``): Gaussian (2, 2, L, d) at four lengths around the chunk C that the
  path tiles by (C - 1, C, C + 1, 2C + 3; C = the chunk rounded up to a power of two >= 16 for
  triton, 64 for fla), the two longer ones with left and right key padding. Softmax kernels: the
  key in the middle points along the longest projection row, ``JUMP`` above every earlier key's
  scale s_j, so the stabilizer jumps mid-sequence (the causal running max changes inside a chunk)
  while every logit stays O(10). ReLU: q_i shares half its direction with k_i (no causal
  denominator near 0), and no logit lies within ``KINK`` of relu's kink (where float32 and float64
  may take the gradient on different sides);
- reference: the module's batched path in float64 on the same input values (exact to ~1e-15);
- checked: the output and the gradients of q, k and v (for a random output gradient) of the fast
  path on float32 inputs and on inputs in the caller's dtype (the same values: the inputs are
  rounded to that dtype first);
- bound, per entry (``_compare``): max(``TOL_FACTOR`` u_dot max|ref|, ``CALIBRATION`` x the largest
  error of the float32 batched path on the same inputs) + u_store |ref|, per output / gradient.

The first term is the derivation of the interpreter tests (tests/model/test_favor_triton.py,
tests/model/test_favor_fla.py), kept here in one place: every output and gradient is a sum of at most
L m terms (< 10^5 here) of features exp(logit - max) (or relu(logit) + eps) whose logits are O(10).
Each feature carries a relative error of about |logit| u and a blocked sum adds about log2(L m) u,
so the error stays below 64 u of the largest entry (a 2x-3x margin), u the unit roundoff of the
path's dots (``dot_unit_roundoff``: 2^-24 for float32 ("ieee") dots and in the interpreter, 2^-11
for TF32: fla's default on NVIDIA GPUs, ``PROTEIN_PERFORMER_TRITON_DOT=tf32``). The second term
covers the inputs that the derivation does not: an entry that is a difference of larger terms (a
gradient term (v_j - out_i) / D_i) amplifies the rounding of those terms for every float32 order of
summation alike; the float32 batched path (TF32 off) measures it, and a correct path stays within a
small factor of it (seen: 4.2x for the scan at a small causal ReLU denominator, before q shared
k's direction). Measured on the CPU (d = m = 16 over 30-60 projections, d = 64, m = 256 over 8):
correct float32 paths (scan; Triton kernels interpreted) reach at most 0.63 of the bound; broken
kernels off by 1e-4 reach > 20 (tests/model/test_favor_probe.py). The last term: every path computes
in float32 from the caller's inputs and rounds each result to the caller's dtype once, one rounding
step of that dtype (eps: 2^-7 bfloat16, 2^-10 float16; 2^-23 float32) as in the float16 test.

On a mismatch (or a non-finite number) one warning names the largest error relative to its bound
(output or which gradient, length and dtype), the error and the bound; the configuration then uses
the batched path. A launch error (``TritonError``) falls back the same way.
``PROTEIN_PERFORMER_FAVOR_IMPL=batched|triton|fla`` forces a path on CUDA tensors and skips the
probe (``forced_impl``). Tests treat the CPU like CUDA (under TRITON_INTERPRET=1) by adding "cpu"
to ``FAST_DEVICE_TYPES``.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

log = logging.getLogger("protein_performer.model.favor")

ENV_IMPL = "PROTEIN_PERFORMER_FAVOR_IMPL"
FORCEABLE = ("batched", "triton", "fla")
FAST_DEVICE_TYPES: tuple[str, ...] = ("cuda",)  # where impl "auto" / "triton" / "fla" are probed
TOL_FACTOR = 64
CALIBRATION = 4  # a correct float32 path may err this many times the float32 batched path's error
FLA_CHUNK = 64  # chunk_simple_gla's chunk size
JUMP = 3.0  # how far the middle key's scale rises above the earlier keys' (softmax kernels)
KINK = 1e-3  # no relu logit of the probe's inputs is closer to 0 (float32 computes them to ~1e-6)
# unit roundoff of a tl.dot on float32 operands, by input precision: "tf32x3" keeps ~22 bits of each
# operand (about float32); "tf32" rounds them to 11 bits; anything else: bfloat16's 8 (the coarsest)
DOT_UNIT_ROUNDOFF = {"ieee": 2.0**-24, "tf32x3": 2.0**-21, "tf32": 2.0**-11}
RESULTS: dict[tuple, bool] = {}  # probe_key -> whether the fast path may run


def forced_impl() -> str | None:
    """The implementation ``PROTEIN_PERFORMER_FAVOR_IMPL`` forces (None when unset or empty)."""
    value = os.environ.get(ENV_IMPL, "").strip()
    if not value:
        return None
    if value not in FORCEABLE:
        raise ValueError(f"{ENV_IMPL} must be one of {', '.join(FORCEABLE)} (or unset), got {value!r}")
    return value


def dot_unit_roundoff(impl: str, device_type: str) -> float:
    """u of the fast path's dots: float32 in Triton's interpreter (the CPU); on a GPU the Triton
    kernels' ``PROTEIN_PERFORMER_TRITON_DOT`` and fla's ``TRITON_F32_DEFAULT`` (default TF32)."""
    if device_type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return DOT_UNIT_ROUNDOFF["ieee"]
    if impl == "triton":
        from protein_performer.model.favor.triton_ops import DOT_PRECISION as precision
    else:
        precision = os.environ.get("TRITON_F32_DEFAULT", "tf32")
    return DOT_UNIT_ROUNDOFF.get(precision, 2.0**-8)


def tolerance(impl: str, device_type: str, dtype: torch.dtype) -> tuple[float, float]:
    """(factor of max|ref|, factor of |ref|) of the bound for results in ``dtype`` (module docstring)."""
    return TOL_FACTOR * dot_unit_roundoff(impl, device_type), torch.finfo(dtype).eps


def probe_chunk(impl: str, chunk: int) -> int:
    """The chunk the fast path tiles the sequence by."""
    return FLA_CHUNK if impl == "fla" else max(16, 1 << (int(chunk) - 1).bit_length())


def probe_key(fa, impl: str, x: torch.Tensor) -> tuple:
    """What the probe's verdict depends on (the cache key)."""
    return (impl, str(x.device), x.dtype, fa.dim_head, fa.nb_features, fa.kind, fa.causal, fa._chunk(impl), fa.eps)


@dataclass
class Finding:
    """The largest error of a probe relative to its bound (ratio > 1: a mismatch)."""

    ratio: float
    error: float
    bound: float
    where: str

    def __str__(self) -> str:
        return f"largest error {self.error:.3g} in {self.where}, bound {self.bound:.3g}"


def probe_inputs(fa, length: int, padded: bool, dtype: torch.dtype, device, seed: int = 0):
    """q, k, v, the output gradient (2, 2, length, d) in ``dtype`` and the key padding mask (or None):
    Gaussian, with the stabilizer jump in the middle (softmax kernels) or no relu logit within
    ``KINK`` of 0 (relu, whose gradient float32 and float64 may otherwise take on either side)."""
    g = torch.Generator().manual_seed(seed + length)
    b, h, d = 2, 2, fa.dim_head
    q, k, v, grad = (torch.randn(b, h, length, d, generator=g) for _ in range(4))
    w = fa.directions(torch.float64).detach().cpu()  # W, or [W; -W] for hyperbolic features
    if fa.kind == "relu":
        q = (q + k) * 0.5**0.5  # q_i and k_i share features: no early causal denominator near 0
        for x in (q, k):
            _away_from_kinks(x, w, dtype, g)
    else:
        _jump(k, w, length // 2)
    mask = None
    if padded:
        mask = torch.zeros(b, length, dtype=torch.bool)
        mask[0, :2] = True  # left padding: the first queries see no real key
        mask[1, -3:] = True  # right padding
        mask = mask.to(device)
    return [x.to(dtype).to(device) for x in (q, k, v, grad)] + [mask]


def _jump(k: torch.Tensor, w: torch.Tensor, at: int) -> None:
    """Turn key ``at`` (all rows) along the longest row of w, at the length that puts its scale
    s = max(w^T x) - |x|^2/2 (x = k d^-1/4) ``JUMP`` above every earlier key's: the stabilizer
    jumps while every logit stays O(10), as the bound assumes."""
    d = k.shape[-1]
    x = k[:, :, :at].double() * d**-0.25
    s = (x @ w.T).amax(dim=-1) - 0.5 * (x * x).sum(dim=-1)
    target = (s.max().item() if at else 0.0) + JUMP
    row = w[w.norm(dim=1).argmax()]
    norm = row.norm().item()
    t = norm - max(norm * norm - 2 * target, 0.0) ** 0.5  # t |w| - t^2 / 2 = target (or the max, t = |w|)
    k[:, :, at] = (t * d**0.25 * row / norm).float()


def _away_from_kinks(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, g: torch.Generator) -> None:
    """Redraw the rows of x with a relu logit w^T x d^-1/4 within ``KINK`` of 0 (in ``dtype``)."""
    d = x.shape[-1]
    for _ in range(100):
        near = ((x.to(dtype).double() * d**-0.25) @ w.T).abs().lt(KINK).any(dim=-1)
        if not near.any():
            return
        x[near] = torch.randn(int(near.sum()), d, generator=g)


def _run(fa, impl: str, q, k, v, grad, mask, dtype: torch.dtype) -> list[torch.Tensor]:
    """Output and gradients of q, k, v of one path on the inputs cast to ``dtype``, as float64."""
    x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fa.attend(*x, mask, impl)
    out.backward(grad.to(out.dtype))
    return [t.detach().double() for t in (out, *(t.grad for t in x))]


def _compare(got, ref, cal, tol: tuple[float, float], what: str, worst: Finding) -> Finding:
    """The largest error of ``got`` relative to its bound, per entry max(TOL_FACTOR u_dot max|ref|,
    CALIBRATION x the float32 batched path's (``cal``) largest error) + u_store |ref|."""
    for name, a, b, c in zip(("output", "dq", "dk", "dv"), got, ref, cal):
        base = max(tol[0] * b.abs().max().item(), CALIBRATION * (c - b).abs().max().item())
        bound = base + tol[1] * b.abs()
        err = (a - b).abs()
        ratio = err / bound.clamp_min(torch.finfo(torch.float64).tiny)
        ratio = torch.where(torch.isfinite(a), ratio, torch.full_like(ratio, float("inf")))
        at = int(ratio.argmax())
        if ratio.flatten()[at].item() > worst.ratio:
            e, bd = err.flatten()[at].item(), bound.flatten()[at].item()
            worst = Finding(ratio.flatten()[at].item(), e, bd, f"{name} at L {b.shape[2]} ({what})")
    return worst


def check_fast_path(fa, impl: str, device, dtype: torch.dtype = torch.float32) -> Finding:
    """Run the fast path ``impl`` of module ``fa`` against its batched path in float64 on ``device``
    (module docstring); returns the largest error relative to its bound. Launch errors propagate."""
    device = torch.device(device)
    chunk = probe_chunk(impl, fa._chunk(impl))
    worst = Finding(0.0, 0.0, 0.0, "nothing")
    dtypes = [torch.float32] + ([dtype] if dtype != torch.float32 else [])
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the float32 batched path without TF32
    try:
        with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device.type):
            for length in (chunk - 1, chunk, chunk + 1, 2 * chunk + 3):
                q, k, v, grad, mask = probe_inputs(fa, length, length > chunk, dtype, device)
                ref = _run(fa, "batched", q, k, v, grad, mask, torch.float64)
                cal = _run(fa, "batched", q, k, v, grad, mask, torch.float32)
                for run_dtype in dtypes:
                    got = _run(fa, impl, q, k, v, grad, mask, run_dtype)
                    tol = tolerance(impl, device.type, run_dtype)
                    what = f"{str(run_dtype).removeprefix('torch.')} inputs"
                    worst = _compare(got, ref, cal, tol, what, worst)
    finally:
        torch.set_float32_matmul_precision(precision)
    return worst


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


def fast_path_ok(fa, impl: str, x: torch.Tensor) -> bool:
    """Whether ``fa`` may run ``impl`` on inputs like ``x``: the probe's verdict, run once per
    ``probe_key``; a mismatch or a launch error logs one warning and gives False."""
    key = probe_key(fa, impl, x)
    if key in RESULTS:
        return RESULTS[key]
    from triton.errors import TritonError

    config = (
        f"{x.device}, {str(x.dtype).removeprefix('torch.')}, d {fa.dim_head}, m {fa.nb_features}, "
        f"kernel {fa.kind}, {'causal' if fa.causal else 'bidirectional'}, chunk {fa._chunk(impl)}"
    )
    try:
        finding = check_fast_path(fa, impl, x.device, x.dtype)
    except TritonError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        log.warning(
            "FAVOR+ impl=%r cannot run (%s; %s: %s); using impl='batched' for it",
            impl,
            config,
            type(exc).__name__,
            first,
        )
        RESULTS[key] = False
        return False
    ok = finding.ratio <= 1.0
    if not ok:
        log.warning(
            "FAVOR+ impl=%r computes wrong numbers (%s): %s (max(%d u x the largest entry, %d x the float32 "
            "batched path's error) + one rounding step of the dtype: favor/probe.py); using impl='batched' "
            "for this configuration (%s=%s forces it)",
            impl,
            config,
            finding,
            TOL_FACTOR,
            CALIBRATION,
            ENV_IMPL,
            impl,
        )
    else:
        log.debug("FAVOR+ impl=%r passed the probe (%s): %s", impl, config, finding)
    RESULTS[key] = ok
    return ok
