#!/usr/bin/env bash
# The GPU speed checks of issue 9 in one short run (about 5.5 minutes on an H100 with
# ROUNDS=1 STEPS=8 COMPILE=0: bench/results/2026-11-27-gpu-h100-round9.md), for a device
# session with little time. launch/gpu-check.sh runs everything; this runs only:
#   1. cuda_test_cuda_gemm and cuda_test_cuda_train: the GEMM and attention paths measured
#      below (cuBLASLt with cached algorithms, the expert GEMMs on several streams, the weight
#      copy, the attention's causal query blocks and its opt-in flash forward) against the
#      CPU, exact bf16 rounding, determinism, bit-identical resume; SANITIZE=1 adds (after 4)
#      compute-sanitizer's memcheck and racecheck of the flash attention test (TU_ONLY=flash);
#   2. (first of the benches) moet bench --profile: where a step goes, op by op (events
#      around each op: ms, calls, TFLOP/s of the matmuls and attention, the GPU's wait for the
#      host);
#   3. moet bench configs/bench-gpu-olmoe.ini and its A/Bs, alternated (VARIANTS, below); each
#      prints its host line: GEMM calls, host time in them, weights converted, waits;
#   4. bench/vs_pytorch.py against HF transformers eager and torch.compile, on new tokens every
#      step, where torch and transformers are installed.
#   bash launch/gpu-perf.sh [BUNDLE] [LOGDIR]
# Settings (environment): ROUNDS (A/B alternations, default 2), STEPS and WARMUP of each bench
# (10, 3), COMPILE=0 (no torch.compile'd peer: saves its ~40 s compile), PEER=0 (no
# vs_pytorch.py), BUDGET_S (start no
# check after this many seconds, so that a lease's time limit cuts no log in half; default
# none), VARIANTS (which A/Bs, in order; default all):
#   default          as configured
#   no_weight_copy   MOET_CUDA_WEIGHT_COPY=0: every GEMM op converts its weights
#   vary             --vary-tokens: new tokens every step (the experts' row counts change)
#   vary_gemmex      the same with MOET_CUDA_GEMM_LT=0 (cublasGemmEx)
#   attn_one_block   MOET_CUDA_ATTN_QBLOCK=1000000: the attention as one block
#   one_stream       MOET_CUDA_GEMM_STREAMS=1: the expert GEMMs on one stream
#   flash            MOET_CUDA_ATTN_FLASH=1: the attention forward as one flash kernel
#   base             the bundle's bin/moet-base (gpu-bundle.sh BASE_REV=REV: moet built at an
#                    earlier revision), for changes without a switch; in the default list
#                    (second) and profiled too (profile_base) where the bundle has it
# BUNDLE and LOGDIR as for launch/gpu-check.sh (a folder from launch/gpu-bundle.sh, its
# .tar.gz, or a build folder; default gpu-bundle and gpu-logs). Prints a summary of the bench
# lines; the exit status is the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
export CHECK_TIMEOUT=${CHECK_TIMEOUT:-300}
source launch/gpu-common.bash "$@" # BUNDLE, LOG, BIN, check, fail; the GPU's name to gpu.txt
check cuda_test_cuda_gemm "$BIN/cuda_test_cuda_gemm"
check cuda_test_cuda_train "$BIN/cuda_test_cuda_train"
ROUNDS=${ROUNDS:-2} STEPS=${STEPS:-10} WARMUP=${WARMUP:-3} COMPILE=${COMPILE:-1}
BUDGET_S=${BUDGET_S:-0}
HAVE_BASE=0; [ -x "$BIN/moet-base" ] && HAVE_BASE=1
[ -f "$BUNDLE/base-rev.txt" ] && echo "base: $(cat "$BUNDLE/base-rev.txt")"
DEFAULT_VARIANTS="default no_weight_copy vary vary_gemmex attn_one_block one_stream flash"
((HAVE_BASE)) && DEFAULT_VARIANTS=${DEFAULT_VARIANTS/default/default base}
VARIANTS=${VARIANTS:-$DEFAULT_VARIANTS}
declare -A VARIANT=( # environment (NAME=value), executable (exe:NAME) and bench arguments
  [default]="" [no_weight_copy]="MOET_CUDA_WEIGHT_COPY=0" [vary]="--vary-tokens"
  [vary_gemmex]="MOET_CUDA_GEMM_LT=0 --vary-tokens"
  [attn_one_block]="MOET_CUDA_ATTN_QBLOCK=1000000" [one_stream]="MOET_CUDA_GEMM_STREAMS=1"
  [flash]="MOET_CUDA_ATTN_FLASH=1" [base]="exe:moet-base")
within_budget() { # the next check starts only inside BUDGET_S
  if ((BUDGET_S > 0 && SECONDS > BUDGET_S)); then
    echo "$1: not started (${SECONDS}s > BUDGET_S=$BUDGET_S)"; return 1
  fi
}
timed() { within_budget "$1" && check "$@"; }
B=(bench configs/bench-gpu-olmoe.ini --steps "$STEPS" --warmup "$WARMUP")
timed profile "$BIN/moet" "${B[@]}" --profile
((HAVE_BASE)) && timed profile_base "$BIN/moet-base" "${B[@]}" --profile
for ((round = 1; round <= ROUNDS; round++)); do
  for v in $VARIANTS; do
    [[ -v "VARIANT[$v]" ]] || { echo "VARIANTS: no variant $v"; fail=$((fail + 1)); continue; }
    envs=() args=() exe=moet
    for w in ${VARIANT[$v]}; do
      case $w in exe:*) exe=${w#exe:} ;; *=*) envs+=("$w") ;; *) args+=("$w") ;; esac
    done
    [ -x "$BIN/$exe" ] || { echo "$v: no $BIN/$exe (gpu-bundle.sh BASE_REV=...)"; fail=$((fail + 1)); continue; }
    timed "perf_${v}_$round" env "${envs[@]}" "$BIN/$exe" "${B[@]}" "${args[@]}"
  done
done
if [[ ${PEER:-1} == 1 ]] && python3 -c 'import torch, transformers' 2>/dev/null; then
  C=(); ((COMPILE)) && C=(--compile)
  timed vs_pytorch_vary python3 bench/vs_pytorch.py "$BIN/moet" configs/bench-gpu-olmoe.ini \
    --device cuda --threads "$OMP_NUM_THREADS" --steps "$STEPS" --warmup "$WARMUP" "${C[@]}" \
    --vary-tokens
  grep -E '^\|' "$LOG/vs_pytorch_vary.log" 2>/dev/null || true
fi
if [[ ${SANITIZE:-0} == 1 ]]; then # last: the speed figures first where time is short
  timed memcheck_flash env TU_ONLY=flash compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$BIN/cuda_test_cuda_gemm"
  timed racecheck_flash env TU_ONLY=flash compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$BIN/cuda_test_cuda_gemm"
fi
sed -n '/^where a step goes/,$p' "$LOG/profile.log" 2>/dev/null | head -50
((HAVE_BASE)) && sed -n '/^where a step goes/,$p' "$LOG/profile_base.log" 2>/dev/null | head -24
for f in "$LOG"/perf_*.log; do
  [ -e "$f" ] || continue
  printf '%-34s %s | %s | %s\n' "$(basename "$f" .log)" \
    "$(grep -o 'step time (median of [0-9]*): [0-9.]* s' "$f")" \
    "$(grep -o 'MFU: *[0-9.]*%' "$f" | tr -s ' ')" "$(sed -n 's/^host, per timed step: *//p' "$f")"
done
echo "failed checks: $fail (logs in $LOG)"
exit $fail
