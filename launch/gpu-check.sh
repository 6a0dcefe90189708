#!/usr/bin/env bash
# The GPU checks of the CUDA backend, in one run (ARCHITECTURE §8, §9, §10):
#   1. every CUDA test: each kernel against the CPU backend, whole training steps against the
#      CPU, resume (cuda_test_*);
#   2. compute-sanitizer memcheck on the kernel tests;
#   3. tiny-moe trained 20 steps with `moet train` on cuda and on cpu: the two loss curves;
#   4. `moet bench configs/bench-gpu-olmoe.ini`: tokens/s, MFU, peak memory;
#   5. the NCCL transport (cuda_test_nccl_comm, 1 rank; 2 ranks where mpirun and 2 GPUs exist)
#      and multi-rank training on GPUs (tests/cli/train_gpu.sh: MPI vs NCCL, ZeRO-1, ep 2);
#   6. generation: greedy text from the tiny-moe run on cuda with fp32 GEMMs = on the cpu
#      (bf16 shown beside), and tokens/s of `moet generate` on the bench-gpu-olmoe shapes.
#   bash launch/gpu-check.sh [BUNDLE] [LOGDIR]
# BUNDLE is a folder from launch/gpu-bundle.sh (bin/, lib/), its .tar.gz, or a build folder;
# LOGDIR receives one log per check (default gpu-logs; a check is stopped after CHECK_TIMEOUT
# s, default 600); checkpoints go to CKDIR (default /tmp/moet-gpu-ck, not LOGDIR, which may be
# copied back). Every check runs even when an earlier one fails; the exit status is the number
# of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
CK=${CKDIR:-/tmp/moet-gpu-ck}
mkdir -p "$CK"
source launch/gpu-common.bash "$@" # BUNDLE, LOG, BIN, check, fail; the GPU's name to gpu.txt
export PATH=$PATH:/usr/local/cuda/bin # compute-sanitizer
for t in cuda_test_cuda_kernels cuda_test_cuda_gemm cuda_test_cuda_moe_ops cuda_test_cuda_train; do
  check "$t" "$BIN/$t"
done
# tiny-moe on both devices from the sample documents
for split in train valid; do
  ls data/sample/tokens/$split/*.npy >/dev/null 2>&1 ||
    check "tokenize_$split" "$BIN/moet" tokenize --tokenizer data/tokenizers/gpt-neox-olmo-dolma-v1_5.json \
      --out data/sample/tokens/$split data/sample/documents/$split.jsonl.gz
done
for dev in cuda cpu; do
  check "train_tiny_$dev" "$BIN/moet" train --config configs/tiny-moe.ini \
    --set train.max_steps=20 --set train.eval_every=10 --set train.device=$dev \
    --set checkpoint.dir="$CK/tiny-$dev"
done
paste <(grep -o '"step":[0-9]*,"tokens":[0-9]*,"loss":[^,]*' "$CK/tiny-cuda/metrics.jsonl") \
      <(grep -o '"loss":[^,]*' "$CK/tiny-cpu/metrics.jsonl") > "$LOG/tiny-losses.txt" || true
# generation from the cuda run's checkpoint: greedy ids on cuda (fp32 GEMMs) = on the cpu
gen() { # name, --set ...
  local name=$1; shift
  check "$name" "$BIN/moet" generate "$CK/tiny-cuda" --prompt "The Debian package" \
    --temperature 0 --max-new-tokens 40 --json "$@"
}
gen generate_cpu --set train.device=cpu
gen generate_cuda_fp32 --set train.device=cuda --set train.precision=fp32
gen generate_cuda_bf16 --set train.device=cuda
ids() { grep -o '"ids":\[[^]]*\]' "$LOG/$1.log"; }
check generate_cuda_fp32_eq_cpu test -n "$(ids generate_cpu)" -a "$(ids generate_cpu)" = "$(ids generate_cuda_fp32)"
# upcycling on the GPU: a dense model and its G = 2 upcycle (virtual-group routers: the slices
# of a copy must tie exactly under bf16 GEMMs too) give the same eval loss on cuda
check train_dense_cuda "$BIN/moet" train --config configs/tiny-dense.ini --set train.max_steps=20 \
  --set train.eval_every=0 --set train.device=cuda --set checkpoint.dir="$CK/dense"
check upcycle_g2 "$BIN/moet" upcycle --dense "$CK/dense" --config configs/tiny-moe.ini \
  --set moe.norm_topk_prob=true --set moe.expert_d_ff=128 --granularity 2 --out "$CK/up2"
for m in dense up2; do
  check "eval_${m}_cuda" "$BIN/moet" eval "$CK/$m" --data 'data/sample/tokens/valid/*.npy' \
    --batches 4 --json --set train.device=cuda
done
loss() { grep -o '"loss":[^,}]*' "$LOG/$1.log" | cut -d: -f2; }
check upcycle_g2_eq_dense_cuda awk -v a="$(loss eval_dense_cuda)" -v b="$(loss eval_up2_cuda)" \
  'BEGIN { d = a - b; if (d < 0) d = -d; print "dense", a, "upcycled", b, "diff", d; exit !(a != "" && d < 1e-3) }'
# tokens/s of generation on the bench-gpu-olmoe shapes (4 layers of OLMoE-1B-7B): one step
# writes a model-only checkpoint, then 200 tokens are sampled from it
check olmoe4_checkpoint "$BIN/moet" train --config configs/bench-gpu-olmoe.ini \
  --set train.max_steps=1 --set train.micro_batch=1 --set train.global_batch=1 \
  --set checkpoint.every=1 --set checkpoint.model_only=true --set checkpoint.dir="$CK/olmoe4"
check generate_olmoe4 "$BIN/moet" generate "$CK/olmoe4" --prompt "The Debian package" \
  --max-new-tokens 200 --seed 1
# the same with every GEMM converting its weights for each token (the A/B of the weight copy:
# decoding is bound by the weights' memory traffic); the same tokens (seed 1)
check generate_olmoe4_no_weight_copy env MOET_CUDA_WEIGHT_COPY=0 "$BIN/moet" generate \
  "$CK/olmoe4" --prompt "The Debian package" --max-new-tokens 200 --seed 1
check bench_gpu_olmoe "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 10 --warmup 3
# The A/B of the cuBLASLt algorithm cache (2026-11-27-gpu-lt-cache.md): the bf16-operand GEMMs
# through cublasGemmEx (a host heuristic per new shape), on the same tokens every step and on
# new tokens every step (--vary-tokens: the experts' row counts change as in training). Each
# log's "host, per timed step" line says how much host time went into the GEMM calls and how
# long the host waited for the GPU.
check bench_gpu_olmoe_gemmex env MOET_CUDA_GEMM_LT=0 \
  "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 10 --warmup 3
check bench_gpu_olmoe_vary "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 10 --warmup 3 \
  --vary-tokens
check bench_gpu_olmoe_vary_gemmex env MOET_CUDA_GEMM_LT=0 \
  "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 10 --warmup 3 --vary-tokens
# the attention as one block, as before 2026-11-27 (the A/B of the causal query blocks)
check bench_gpu_olmoe_attn_one_block env MOET_CUDA_ATTN_QBLOCK=1000000 \
  "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 10 --warmup 3
# the expert GEMMs one after the other on the legacy stream, as before 2026-11-27 (the A/B of
# the expert GEMMs on 4 streams)
check bench_gpu_olmoe_one_stream env MOET_CUDA_GEMM_STREAMS=1 \
  "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 10 --warmup 3
# every GEMM op converting its weights, as before the bf16 copy of the parameters (the A/B
# of kernels/cuda/weights.cu)
check bench_gpu_olmoe_no_weight_copy env MOET_CUDA_WEIGHT_COPY=0 \
  "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 10 --warmup 3
# where the steps settle after 40 warm-up steps (round 2's bf16 steps got faster through the
# run: 0.54 -> 0.32 s, 2026-11-26-gpu-bf16-operands.md)
check bench_gpu_olmoe_long "$BIN/moet" bench configs/bench-gpu-olmoe.ini --steps 20 --warmup 40
grep -H -E 'step time|MFU|peak|host, per' "$LOG"/bench_gpu_olmoe*.log || true
if command -v compute-sanitizer >/dev/null; then
  for t in cuda_test_cuda_kernels cuda_test_cuda_gemm cuda_test_cuda_moe_ops; do
    check "memcheck_$t" compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/$t"
  done
fi
check nccl_comm_np1 "$BIN/cuda_test_nccl_comm"
if command -v mpirun >/dev/null; then
  check nccl_comm_np2 mpirun --allow-run-as-root --oversubscribe -np 2 "$BIN/cuda_test_nccl_comm"
fi
check train_gpu bash tests/cli/train_gpu.sh "$BIN/moet"
echo "failed checks: $fail (logs in $LOG)"
exit $fail
