#!/usr/bin/env bash
# One prepared GPU check of the Triton backend, about 8 minutes, for one device call.
#
# Run from the root of the checkout (the project importable with PYTHONPATH=.):
#
#     OUT="$OUT" bash benchmarks/device/device_check.sh   # on the device (BUDGET=470 by default)
#     SMOKE=1 TRITON_INTERPRET=1 PYTHON=.venv/bin/python OUT=smoke_out \
#         bash benchmarks/device/device_check.sh          # on the CPU: checks the script only
#
# Stages (each its own process, each stopped at its share of the budget, each writing its files
# under $OUT after every item, so a cut-short run still returns what it finished):
#   env     versions, device properties, 1 GiB copy bandwidth              -> env.txt
#   check   every path forced (residual + ReLU, bitwise repeat) on gpu_check's mid shapes first,
#           running statistics, non-finite input, CUDA-graph capture, default paths on 7 real-size
#           cases (fp32/bf16/fp16, both layouts, 2D), bitwise repeats at real size, BatchNorm2d,
#           torch.compile of batch_norm; registers and spills of every compiled kernel
#                                                                           -> check.md, kernels.csv
#   bench   ours vs torch eager, eval / train / train+backward, all 22 cases, priority cases first,
#           with the host's enqueue time; fused ReLU and add+ReLU; a sweep of the configs behind
#           the review's hypotheses; CUDA-graph replay of the small cases; torch.compile (fresh,
#           fullgraph) train+backward on the priority cases while time lasts
#                                                                           -> bench.md, bench.csv
#   resnet  ResNet-50 training, bf16 autocast channels_last, batch 128, torch vs ours
#                                                                           -> resnet.md
#   summary failures, the train+backward table, the sweep and ResNet lines, printed last
# log.txt holds everything printed. 7 files in all (the device returns at most 8).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
export OUT="${OUT:-device_out}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BUDGET="${BUDGET:-470}"   # seconds for the whole script: the 10-minute call limit, with margin
T0=$(date +%s)
LOG="$OUT/log.txt"
: >"$LOG"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# run_stage NAME MOST KEEP: run stage NAME for at most MOST seconds, leaving KEEP seconds of the
# budget to the stages after it.
run_stage() {
  local name=$1 most=$2 keep=$3 l lim rc t
  l=$(left); lim=$(( l - keep )); (( lim > most )) && lim=$most
  if (( lim < 15 )); then
    echo "== $name skipped: ${l}s of the budget left" | tee -a "$LOG"; return
  fi
  echo "== $name: up to ${lim}s (${l}s of ${BUDGET}s left)" | tee -a "$LOG"
  t=$(date +%s)
  DEADLINE=$(( t + lim - 10 )) timeout -s INT -k 10 "$lim" "$PY" "$HERE/device_check.py" "$name" \
    2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(( $(date +%s) - t ))s" | tee -a "$LOG"
}

{
  echo "== $(date -u +%FT%TZ) $(hostname) in $(pwd)"
  git log -1 --format='== commit %h %s' 2>/dev/null || true
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit \
      --format=csv 2>&1 || true
  fi
} 2>&1 | tee -a "$LOG"

# Shares of the budget (470 s: check 169 s, bench 211 s, ResNet the rest, about 75 s); a stage
# that ends early leaves its time to the ones after it.
run_stage env    40 0
run_stage check  $(( BUDGET * 36 / 100 )) $(( BUDGET * 55 / 100 ))
run_stage bench  $(( BUDGET * 45 / 100 )) $(( BUDGET * 16 / 100 ))
run_stage resnet $(( BUDGET * 24 / 100 )) 5
"$PY" "$HERE/device_check.py" summary 2>&1 | tee -a "$LOG"
echo "== done in $(( $(date +%s) - T0 ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
