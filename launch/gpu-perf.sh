#!/usr/bin/env bash
# The GPU speed checks of issue 9 in one short run (an estimated 8-10 minutes on an H100; not
# yet run on one), for a device session with little time. launch/gpu-check.sh runs
# everything; this runs only:
#   1. cuda_test_cuda_gemm and cuda_test_cuda_train: the GEMM paths measured below (cuBLASLt
#      with cached algorithms, the expert GEMMs on several streams, the weight copy, the
#      attention's causal query blocks) against the CPU, exact bf16 rounding, determinism, bit-identical resume;
#   2. moet bench configs/bench-gpu-olmoe.ini and its A/Bs, alternated: the default;
#      MOET_CUDA_WEIGHT_COPY=0 (every GEMM op converts its weights, no bf16 copy of the
#      parameters); the default and MOET_CUDA_GEMM_LT=0 (cublasGemmEx) on new tokens every step
#      (--vary-tokens: the experts' row counts change as in training);
#      MOET_CUDA_ATTN_QBLOCK=1000000 (the attention as one block); MOET_CUDA_GEMM_STREAMS=1
#      (the expert GEMMs one after the other on one stream). Each prints its host line: GEMM
#      calls, host time in them, weights converted, waits;
#   3. bench/vs_pytorch.py against HF transformers eager and torch.compile, on new tokens every
#      step, where torch and transformers are installed;
#   (first of the benches) moet bench --profile: where a step goes, op by op (events around
#      each op: ms, calls, TFLOP/s of the matmuls and attention, the GPU's wait for the host).
#   bash launch/gpu-perf.sh [BUNDLE] [LOGDIR]
# Settings (environment): ROUNDS (A/B alternations, default 2), STEPS and WARMUP of each bench
# (10, 3), COMPILE=0 (no torch.compile'd peer: saves its ~40 s compile), BUDGET_S (start no
# check after this many seconds, so that a lease's time limit cuts no log in half; default none).
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
within_budget() { # the next check starts only inside BUDGET_S
  if ((BUDGET_S > 0 && SECONDS > BUDGET_S)); then
    echo "$1: not started (${SECONDS}s > BUDGET_S=$BUDGET_S)"; return 1
  fi
}
timed() { within_budget "$1" && check "$@"; }
B=(bench configs/bench-gpu-olmoe.ini --steps "$STEPS" --warmup "$WARMUP")
timed profile "$BIN/moet" "${B[@]}" --profile
for ((round = 1; round <= ROUNDS; round++)); do
  timed "perf_default_$round" "$BIN/moet" "${B[@]}"
  timed "perf_no_weight_copy_$round" env MOET_CUDA_WEIGHT_COPY=0 "$BIN/moet" "${B[@]}"
  timed "perf_vary_$round" "$BIN/moet" "${B[@]}" --vary-tokens
  timed "perf_vary_gemmex_$round" env MOET_CUDA_GEMM_LT=0 "$BIN/moet" "${B[@]}" --vary-tokens
  timed "perf_attn_one_block_$round" env MOET_CUDA_ATTN_QBLOCK=1000000 "$BIN/moet" "${B[@]}"
  timed "perf_one_stream_$round" env MOET_CUDA_GEMM_STREAMS=1 "$BIN/moet" "${B[@]}"
done
if python3 -c 'import torch, transformers' 2>/dev/null; then
  C=(); ((COMPILE)) && C=(--compile)
  timed vs_pytorch_vary python3 bench/vs_pytorch.py "$BIN/moet" configs/bench-gpu-olmoe.ini \
    --device cuda --threads "$OMP_NUM_THREADS" --steps "$STEPS" --warmup "$WARMUP" "${C[@]}" \
    --vary-tokens
  grep -E '^\|' "$LOG/vs_pytorch_vary.log" 2>/dev/null || true
fi
sed -n '/^where a step goes/,$p' "$LOG/profile.log" 2>/dev/null | head -50
for f in "$LOG"/perf_*.log; do
  [ -e "$f" ] || continue
  printf '%-34s %s | %s | %s\n' "$(basename "$f" .log)" \
    "$(grep -o 'step time (median of [0-9]*): [0-9.]* s' "$f")" \
    "$(grep -o 'MFU: *[0-9.]*%' "$f" | tr -s ' ')" "$(sed -n 's/^host, per timed step: *//p' "$f")"
done
echo "failed checks: $fail (logs in $LOG)"
exit $fail
