#!/usr/bin/env bash
# Every GPU measurement of issue 11, in one script (a few minutes on an H200):
#   1. attention table, bf16, fwd+bwd, 1 x 8 x L x 64, m 256, L 1024..65536, causal and bidirectional:
#      exact SDPA (flash), FAVOR+ softmax auto (= triton on CUDA when triton imports) / batched / scan /
#      torch.compile / triton (favor/triton_kernels.py), FAVOR+ ReLU, and fla-core's chunk_linear_attn
#      on our features when fla is installed; time + peak memory.
#   2. whole model: train_throughput.py, the 36-layer paper configs, bf16, L 1024 / 4096 / 8192.
# Writes benchmarks/results/gpu/{attention_cuda_bf16.json,.md, train_throughput_cuda_bf16_paper.json,.md}.
#
#   bash benchmarks/gpu.sh            # on a machine with a CUDA GPU and a CUDA build of torch
#   bash benchmarks/gpu.sh --dry-run  # CPU, tiny sizes: checks that every Python step runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=benchmarks/results/gpu
DRY=0
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

METHODS=(exact_sdpa favor_softmax favor_softmax_batched favor_softmax_scan favor_softmax_compile favor_relu favor_relu_compile)
if "$PY" -c 'import triton' 2>/dev/null; then
  METHODS+=(favor_softmax_triton)
else
  echo "note: triton not installed (pip install -e '.[gpu]'): its row is left out" >&2
fi
if "$PY" -c 'import fla.ops.linear_attn' 2>/dev/null; then
  METHODS+=(favor_softmax_fla)
else
  echo "note: fla-core not installed (pip install 'fla-core>=0.6,<0.7'): its row is left out" >&2
fi

echo "== attention table (${DEV[*]})"
"$PY" benchmarks/attention.py "${DEV[@]}" --lengths "${LENGTHS[@]}" --methods "${METHODS[@]}" \
  --reps "$REPS" --time-cap 30 --out "$OUT/attention_${DEV[1]}_${DEV[3]}.json" | tee "$OUT/attention_${DEV[1]}_${DEV[3]}.log"
sed -n '/^\*\*causal/,$p' "$OUT/attention_${DEV[1]}_${DEV[3]}.log" | sed '/^wrote /d' > "$OUT/attention_${DEV[1]}_${DEV[3]}.md"

echo "== whole model, 36-layer paper configs"
"$PY" benchmarks/train_throughput.py "${DEV[@]}" --config paper --lengths "${TT_LENGTHS[@]}" \
  --tokens-per-step "$TT_TOKENS" --steps "$REPS" --out "$OUT" || echo "note: a train_throughput floor failed (see the table)" >&2

echo "results in $OUT"
