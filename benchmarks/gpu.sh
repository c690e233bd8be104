#!/usr/bin/env bash
# Every GPU measurement of issue 11, in one script (a few minutes on an H200):
#   1. attention table, bf16, fwd+bwd, 1 x 8 x L x 64, m 256, L 1024..65536, causal and bidirectional:
#      exact SDPA (flash), FAVOR+ softmax auto (= triton on CUDA when triton imports) / batched / scan /
#      torch.compile / triton (favor/triton_kernels.py), FAVOR+ ReLU (auto, compile, triton), and causal rows on
#      fla-core's kernels (favor/fla_backend.py: softmax and relu with our semantics, and softmax through
#      chunk_linear_attn(normalize=True) with the JAX semantics); time + peak memory.
#      Before it, when triton imports: the Triton kernels (compiled) against the float64 PyTorch path,
#      forward and gradients, with ieee and tf32x3 dots, and fla's kernels (benchmarks/fla_check.py) with
#      tf32 and ieee dots, and what FavorAttention's probe decides (benchmarks/probe_check.py: the fast paths
#      against the batched path on small inputs, the check every first CUDA call runs; a rejected path's
#      rows measure the batched path); after it, the triton rows again with tf32x3 dots.
#      fla-core is installed from benchmarks/wheels/ (no network there) into a temporary folder when missing.
#   2. whole model: train_throughput.py, the 36-layer paper configs, bf16, L 1024 / 4096 / 8192.
# Writes benchmarks/results/gpu/{attention_cuda_bf16.json,.md, train_throughput_cuda_bf16_paper.json,.md, probe_cuda.log}.
#
#   bash benchmarks/gpu.sh            # on a machine with a CUDA GPU and a CUDA build of torch
#   bash benchmarks/gpu.sh --dry-run  # CPU, tiny sizes: checks that every Python step runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=benchmarks/results/gpu
DRY=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # protein_performer importable without an install
FLA_WHEEL=benchmarks/wheels/fla_core-0.6.0-py3-none-any.whl
[ "${1:-}" = "--dry-run" ] && DRY=1

if [ "$DRY" = 0 ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); run on a GPU machine, or use --dry-run" >&2
    exit 2
  fi
  DEV=(--device cuda --dtype bf16)
  LENGTHS=(1024 4096 16384 65536)
  TT_LENGTHS=(1024 4096 8192)
  TT_TOKENS=16384
  REPS=5
else
  OUT=$(mktemp -d)/gpu
  export TRITON_INTERPRET=1  # the triton rows run on CPU tensors in Triton's interpreter
  DEV=(--device cpu --dtype fp32)
  LENGTHS=(64 128)
  TT_LENGTHS=(32)
  TT_TOKENS=32
  REPS=1
fi
mkdir -p "$OUT"

METHODS=(exact_sdpa favor_softmax favor_softmax_batched favor_softmax_scan favor_softmax_compile favor_relu favor_relu_batched
         favor_relu_compile)
if "$PY" -c 'import triton' 2>/dev/null; then
  METHODS+=(favor_softmax_triton favor_relu_triton)
  CHECK_L=1000; DOTS=(ieee tf32x3)
  [ "$DRY" = 1 ] && CHECK_L=70 && DOTS=(ieee)
  CHECK=$(mktemp --suffix=.py)
  cat > "$CHECK" <<'PYEOF'
import sys, torch
from protein_performer.model.favor import FavorAttention
dev, n, bad = sys.argv[1], int(sys.argv[2]), 0
g = torch.Generator().manual_seed(0)
q, k, v, go = (torch.randn(2, 4, n, 64, generator=g, dtype=torch.float64).to(dev) for _ in range(4))
mask = torch.zeros(2, n, dtype=torch.bool, device=dev)
mask[1, -n // 10:] = True
for kernel in ("softmax", "relu"):
    for causal in (True, False):
        res = {}
        for impl, dtype in (("batched", torch.float64), ("triton", torch.float32)):
            fa = FavorAttention(64, 256, kernel=kernel, causal=causal, seed=1, impl=impl).to(dev)
            x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = fa(*x, mask)
            out.backward(go.to(dtype))
            res[impl] = [out.double()] + [t.grad.double() for t in x]
        errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(res["triton"], res["batched"])]
        ok = max(errs) < 1e-4
        bad += not ok
        print(f"{kernel:8s} causal={causal!s:5s} max rel err out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs), "ok" if ok else "FAIL")
sys.exit(1 if bad else 0)
PYEOF
  for dot in "${DOTS[@]}"; do  # tl.dot precision of the kernels (triton_ops.DOT_PRECISION)
    echo "== triton kernels (${DEV[1]}, dots $dot) against the PyTorch path (float64), fp32, 2 x 4 x L=$CHECK_L x 64, m 256"
    PROTEIN_PERFORMER_TRITON_DOT=$dot "$PY" "$CHECK" "${DEV[1]}" "$CHECK_L" \
      || echo "error: the triton kernels (dots $dot) disagree with the PyTorch path: their rows are not valid" >&2
  done
else
  echo "note: triton not installed (pip install -e '.[gpu]'): its row is left out" >&2
fi
if ! "$PY" -c 'import fla.ops.simple_gla' 2>/dev/null && "$PY" -c 'import triton' 2>/dev/null && [ -f "$FLA_WHEEL" ]; then
  FLA_DIR=$(mktemp -d)
  "$PY" -m pip install -q --no-deps --no-index --target "$FLA_DIR" "$FLA_WHEEL" \
    && export PYTHONPATH="$PYTHONPATH:$FLA_DIR" && echo "installed $FLA_WHEEL into $FLA_DIR (for this run)"
fi
if "$PY" -c 'import fla.ops.simple_gla, fla.ops.linear_attn' 2>/dev/null; then
  METHODS+=(favor_softmax_fla favor_softmax_fla_normalized favor_relu_fla)
  FLA_L=1000; FLA_DOTS=(tf32 ieee)
  [ "$DRY" = 1 ] && FLA_L=70 && FLA_DOTS=(ieee)
  for dot in "${FLA_DOTS[@]}"; do
    echo "== fla-core $("$PY" -c 'import importlib.metadata as m; print(m.version("fla-core"))') kernels (${DEV[1]}, $dot dots) against the PyTorch path (float64), fp32, 2 x 4 x L=$FLA_L x 64, m 256"
    TRITON_F32_DEFAULT=$dot "$PY" benchmarks/fla_check.py "${DEV[1]}" "$FLA_L" \
      || echo "error: fla's kernels ($dot dots) disagree with the PyTorch path: their rows are not valid" >&2
  done
else
  echo "note: fla-core not importable (needs triton and einops; pip install 'fla-core>=0.6,<0.7'): its rows are left out" >&2
fi

if "$PY" -c 'import triton' 2>/dev/null; then  # what FavorAttention's probe (favor/probe.py) decides here
  PROBE=(--dtype "${DEV[3]}"); [ "$DRY" = 1 ] && PROBE=(--dtype fp32 --small)
  echo "== probe of the fast paths (${DEV[1]}): error / bound, <= 1 = used; default dot precisions"
  "$PY" benchmarks/probe_check.py "${DEV[1]}" "${PROBE[@]}" 2>&1 | grep -v "UserWarning\|_cpu_device_warning" | tee "$OUT/probe_${DEV[1]}.log" \
    || true
  grep -qE "REJECTED|cannot run" "$OUT/probe_${DEV[1]}.log" && echo "error: the probe rejected a fast path: its timing rows measure the batched path" >&2
fi

echo "== attention table (${DEV[*]})"
"$PY" benchmarks/attention.py "${DEV[@]}" --lengths "${LENGTHS[@]}" --methods "${METHODS[@]}" \
  --reps "$REPS" --time-cap 30 --out "$OUT/attention_${DEV[1]}_${DEV[3]}.json" | tee "$OUT/attention_${DEV[1]}_${DEV[3]}.log"
sed -n '/^\*\*causal/,$p' "$OUT/attention_${DEV[1]}_${DEV[3]}.log" | sed '/^wrote /d' > "$OUT/attention_${DEV[1]}_${DEV[3]}.md"

if [ "$DRY" = 0 ] && [[ " ${METHODS[*]} " == *" favor_softmax_triton "* ]]; then
  echo "== attention table, triton rows with tf32x3 dots (PROTEIN_PERFORMER_TRITON_DOT=tf32x3)"
  PROTEIN_PERFORMER_TRITON_DOT=tf32x3 "$PY" benchmarks/attention.py "${DEV[@]}" --lengths "${LENGTHS[@]}" \
    --methods exact_sdpa favor_softmax_triton favor_relu_triton --reps "$REPS" --time-cap 30 \
    --out "$OUT/attention_${DEV[1]}_${DEV[3]}_triton_tf32x3.json" | tee "$OUT/attention_${DEV[1]}_${DEV[3]}_triton_tf32x3.log"
fi

echo "== whole model, 36-layer paper configs"
"$PY" benchmarks/train_throughput.py "${DEV[@]}" --config paper --lengths "${TT_LENGTHS[@]}" \
  --tokens-per-step "$TT_TOKENS" --steps "$REPS" --out "$OUT" || echo "note: a train_throughput floor failed (see the table)" >&2

echo "results in $OUT"
