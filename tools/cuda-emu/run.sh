#!/usr/bin/env bash
# run.sh: builds moet's CUDA backend for the host emulator (tools/cuda-emu/README.md) into
# /tmp/cuda-emu-build and runs the CUDA tests under it, printing their summaries.
#   tools/cuda-emu/run.sh [test ...]
# Tests (default: all): wmma kernels gemm gemm_lt_refused moe_ops train nccl_comm nccl_stall
# nccl_error train_gpu. wmma is the emulator's own self-test of inc/mma.h and the warp votes
# (tools/cuda-emu/selftest_wmma.cu: PASS, then each misuse it lists must be a fatal error); run
# alone it builds only the emulator runtime and the self-test. gemm_lt_refused runs the gemm
# test with EMU_LT_REFUSE=1 (cuBLASLt refuses every algorithm: gemm.cu's fallback to
# cublasGemmEx).
# nccl_comm runs tests/cuda/test_nccl_comm.c on 2 ranks (mpirun, the emulated NCCL over MPI);
# nccl_stall checks that a hung NCCL all-reduce ends the job with the timeout message, and
# nccl_error that an error NCCL reports (a dead peer) while a rank waits ends it at once;
# train_gpu runs tests/cli/train_gpu.sh with an emulated moet (multi-rank training on cuda).
# Environment: BUILD (default /tmp/cuda-emu-build), JOBS (default 2), OMP_NUM_THREADS (default 2),
# EMU_ORDER / EMU_PROTECT / EMU_POISON / EMU_SEED / EMU_STATS (see emu_runtime.cpp),
# EMU_NCCL_STALL / EMU_NCCL_ERROR (emu_nccl.cpp; the nccl_stall and nccl_error runs set them),
# EXTRA_CXXFLAGS: more g++ flags for the .cu files (e.g. "-mfma -ffp-contract=fast" to mimic
# nvcc's default FMA contraction; use a separate BUILD folder),
# PATCHED_CU_DIR: a folder whose *.cu files replace kernels/cuda's of the same name (to go on
# past a bug without touching the repository).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD=${BUILD:-/tmp/cuda-emu-build}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export TU_VERBOSE=${TU_VERBOSE:-1}
TESTS=("$@")
[ ${#TESTS[@]} -eq 0 ] && TESTS=(wmma kernels gemm gemm_lt_refused moe_ops train nccl_comm nccl_stall nccl_error train_gpu)
mkdir -p "$BUILD/src" "$BUILD/obj"
# only the self-test asked for: the moet sources are not built
ONLY_SELFTEST=1
for t in "${TESTS[@]}"; do [ "$t" = wmma ] || ONLY_SELFTEST=0; done

BLAS_INC=/usr/include/x86_64-linux-gnu/openblas-openmp
BLAS_LIB=/usr/lib/x86_64-linux-gnu/openblas-openmp
PKGS="hdf5-openmpi inih libcjson libzstd cunit oniguruma libutf8proc"
CFLAGS="-std=c11 -O2 -g -fopenmp -DMOET_CUDA=1 -DMOET_MPI=1 -D_POSIX_C_SOURCE=200809L \
  -I$ROOT -I$BLAS_INC $(pkg-config --cflags $PKGS)"
CXXFLAGS="-std=c++20 -O2 -g -fno-omit-frame-pointer -D_POSIX_C_SOURCE=200809L -I$HERE/inc \
  -I$HERE -I$ROOT -I$BLAS_INC -Wno-unused-variable -Wno-unused-function ${EXTRA_CXXFLAGS:-}"
# train/comm_nccl.c is built with the emulated nccl.h / cuda_runtime_api.h (C headers)
NCCL_CFLAGS="-DMOET_NCCL=1 -I$HERE/inc"
MPI_CXXFLAGS="-DOMPI_SKIP_MPICXX=1 -DMPICH_SKIP_MPICXX=1 $(pkg-config --cflags ompi-c)"
LIBS="$BLAS_LIB/libopenblas.so -Wl,-rpath,$BLAS_LIB $(pkg-config --libs $PKGS) -lz -lm -lpthread -fopenmp"

# compile SRC OBJ CMD...: only when SRC (or an emulator file) is newer than OBJ
stale() { [ ! -f "$2" ] || [ "$1" -nt "$2" ] || [ "$HERE/inc/cuda_runtime.h" -nt "$2" ] ||
          [ "$HERE/inc/cuda_runtime_api.h" -nt "$2" ] || [ "$HERE/inc/nccl.h" -nt "$2" ] ||
          [ "$HERE/inc/cuda_bf16.h" -nt "$2" ] || [ "$HERE/inc/mma.h" -nt "$2" ] ||
          [ "$HERE/convert.c" -nt "$2" ]; }

# the .cu -> .cpp rewriter (tools/cuda-emu/convert.c)
CONVERT="$BUILD/convert"
if [ ! -x "$CONVERT" ] || [ "$HERE/convert.c" -nt "$CONVERT" ]; then
  gcc -std=c11 -O2 -D_POSIX_C_SOURCE=200809L -o "$CONVERT" "$HERE/convert.c"
fi

jobs_file="$BUILD/jobs.txt"; : > "$jobs_file"
CUS=("$ROOT"/kernels/cuda/*.cu); [ $ONLY_SELFTEST = 1 ] && CUS=()
for cu in "${CUS[@]}"; do
  name=$(basename "$cu" .cu)
  src=$cu
  [ -n "${PATCHED_CU_DIR:-}" ] && [ -f "$PATCHED_CU_DIR/$name.cu" ] && src="$PATCHED_CU_DIR/$name.cu"
  out="$BUILD/src/$name.cpp"; obj="$BUILD/obj/cu_$name.o"
  if stale "$src" "$obj" || [ "$ROOT/kernels/cuda/common.cuh" -nt "$obj" ] ||
     [ "$ROOT/kernels/cuda/cublas_util.cuh" -nt "$obj" ] || [ "$ROOT/kernels/cuda/kernels_cuda.h" -nt "$obj" ] ||
     [ "$ROOT/kernels/env_switch.h" -nt "$obj" ] || [ "$ROOT/kernels/weight_blocks.h" -nt "$obj" ] ||
     [ "$HERE/inc/cublas_v2.h" -nt "$obj" ] || [ "$HERE/inc/cublasLt.h" -nt "$obj" ] || [ -n "${PATCHED_CU_DIR:-}" ]; then
    "$CONVERT" "$src" "$out"
    echo "g++ $CXXFLAGS -c $out -o $obj" >> "$jobs_file"
  fi
done
obj="$BUILD/obj/emu_runtime.o"
if stale "$HERE/emu_runtime.cpp" "$obj" || [ "$HERE/inc/cublas_v2.h" -nt "$obj" ] || [ "$HERE/inc/cublasLt.h" -nt "$obj" ]; then
  echo "g++ $CXXFLAGS -c $HERE/emu_runtime.cpp -o $obj" >> "$jobs_file"
fi
obj="$BUILD/obj/selftest_wmma.o"
if stale "$HERE/selftest_wmma.cu" "$obj"; then
  "$CONVERT" "$HERE/selftest_wmma.cu" "$BUILD/src/selftest_wmma.cpp"
  echo "g++ $CXXFLAGS -c $BUILD/src/selftest_wmma.cpp -o $obj" >> "$jobs_file"
fi
obj="$BUILD/obj/emu_nccl.o"
[ $ONLY_SELFTEST = 1 ] || if stale "$HERE/emu_nccl.cpp" "$obj"; then
  echo "g++ $CXXFLAGS $MPI_CXXFLAGS -c $HERE/emu_nccl.cpp -o $obj" >> "$jobs_file"
fi
CSRC=$(ls "$ROOT"/kernels/cpu/*.c "$ROOT"/train/*.c "$ROOT"/data/*.c "$ROOT"/tests/testutil.c |
       grep -v '/train/main\.c$')
CFILES="$CSRC $(echo "$ROOT"/tests/cuda/test_*.c) $ROOT/train/main.c"
[ $ONLY_SELFTEST = 1 ] && CFILES=""
for c in $CFILES; do
  rel=${c#$ROOT/}; obj="$BUILD/obj/$(echo "$rel" | tr / _ | sed 's/\.c$/.o/')"
  # headers: rebuild everything C when any repository header is newer than the object
  if stale "$c" "$obj" || [ -n "$(find "$ROOT/kernels" "$ROOT/train" "$ROOT/data" "$ROOT/tests" \
       -name '*.h' -newer "$obj" -print -quit)" ]; then
    extra=""; [ "$rel" = train/comm_nccl.c ] && extra=$NCCL_CFLAGS
    echo "gcc $CFLAGS $extra -c $c -o $obj" >> "$jobs_file"
  fi
done
if [ -s "$jobs_file" ]; then
  echo "== building ($(wc -l < "$jobs_file") files, $JOBS jobs) into $BUILD"
  xargs -P "$JOBS" -I{} -d '\n' sh -c '{} || { echo "FAILED: {}" >&2; exit 255; }' < "$jobs_file"
fi
g++ -o "$BUILD/selftest_wmma" "$BUILD/obj/selftest_wmma.o" "$BUILD/obj/emu_runtime.o" $LIBS
# test name -> program: kernels -> cuda_test_cuda_kernels (tests/cuda/test_cuda_kernels.c),
# nccl_comm and nccl_stall -> cuda_test_nccl_comm (tests/cuda/test_nccl_comm.c)
prog() { case $1 in nccl_*) echo cuda_test_nccl_comm ;; train_gpu) echo moet ;; gemm_lt_refused) echo cuda_test_cuda_gemm ;;
          wmma) echo selftest_wmma ;; *) echo "cuda_test_cuda_$1" ;; esac; }
if [ $ONLY_SELFTEST = 0 ]; then
rm -f "$BUILD/libmoet_core_emu.a"
ar rcs "$BUILD/libmoet_core_emu.a" $(for c in $CSRC; do rel=${c#$ROOT/}; echo "$BUILD/obj/$(echo "$rel" | tr / _ | sed 's/\.c$/.o/')"; done) \
  "$BUILD"/obj/cu_*.o "$BUILD/obj/emu_runtime.o" "$BUILD/obj/emu_nccl.o"
for t in kernels gemm moe_ops train nccl_comm; do
  p=$(prog "$t")
  g++ -o "$BUILD/$p" "$BUILD/obj/tests_cuda_${p#cuda_}.o" \
    "$BUILD/obj/tests_testutil.o" "$BUILD/libmoet_core_emu.a" $LIBS
done
# the moet executable itself, for the CLI test of multi-rank training on (emulated) GPUs
g++ -o "$BUILD/moet" "$BUILD/obj/train_main.o" "$BUILD/libmoet_core_emu.a" $LIBS
fi
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --mca btl tcp,self -np 2)

status=0
cd "$ROOT" # the tests read configs/ relative to the repository root
for t in "${TESTS[@]}"; do
  note=""; [ "$t" = nccl_stall ] && note=" (a hung collective)"
  [ "$t" = nccl_error ] && note=" (a dead peer)"
  echo "== $(prog "$t")$note (EMU_ORDER=${EMU_ORDER:-0})"
  log="$BUILD/test_$t.log"
  start=$(date +%s)
  set +e
  case $t in
  wmma) # the self-test, then each misuse must end in the emulator's fatal error
    "$BUILD/selftest_wmma" > "$log" 2>&1
    rc=$?
    sed 's/^/  /' "$log"
    for m in misaligned ldm store_misaligned oob divergent exited vote_mask; do
      { (ulimit -c 0; exec "$BUILD/selftest_wmma" $m) > "$BUILD/test_wmma_$m.log" 2>&1; } 2>/dev/null
      got=$?
      msg=$(grep -m1 '^\*\*\* cuda-emu: ' "$BUILD/test_wmma_$m.log" | sed 's/^\*\*\* cuda-emu: //')
      if [ $got -ne 0 ] && [ -n "$msg" ]; then echo "  ok $m: $msg"
      else echo "  FAIL $m: exit $got, no fatal error (log $BUILD/test_wmma_$m.log)"; rc=1; fi
    done ;;
  nccl_comm) # 2 ranks, one emulated GPU each
    EMU_DEVICES=2 "${MPIRUN[@]}" "$BUILD/$(prog "$t")" > "$log" 2>&1
    rc=$? ;;
  gemm_lt_refused) # cuBLASLt refusing every cached algorithm: each GEMM falls back, same results
    EMU_LT_REFUSE=1 "$BUILD/$(prog gemm)" > "$log" 2>&1
    rc=$?
    grep -q "cuBLASLt refused the cached algorithm" "$log" ||
      { echo "  FAIL: no note about the refused algorithm"; rc=1; } ;;
  train_gpu) # moet train on cuda under mpirun: MPI and NCCL transports, ZeRO-1, ep 2
    EMU_DEVICES=2 OMP_NUM_THREADS=1 bash tests/cli/train_gpu.sh "$BUILD/moet" > "$log" 2>&1
    rc=$? ;;
  nccl_stall|nccl_error)
    # every rank's first NCCL operation hangs (nccl_error: and NCCL then reports a remote
    # error): the job must end, with comm_nccl.c's message, after 2 s (the timeout) or at once
    if [ "$t" = nccl_stall ]; then
      emu="EMU_NCCL_STALL=1"; want="NCCL all-reduce on the world did not finish within 2 s"
    else
      emu="EMU_NCCL_ERROR=1"; want="NCCL error at the wait for the all-reduces on the world"
    fi
    env EMU_DEVICES=2 $emu TEST_NCCL_STALL=1 TEST_NCCL_TIMEOUT_S=2 \
      timeout 120 "${MPIRUN[@]}" "$BUILD/$(prog "$t")" > "$log" 2>&1
    got=$?
    rc=0
    [ $got -ne 0 ] || { echo "  FAIL: the job exited 0"; rc=1; }
    [ $got -ne 124 ] || { echo "  FAIL: the job hung (killed by timeout after 120 s)"; rc=1; }
    grep -q "$want" "$log" || { echo "  FAIL: no message \"$want\" from comm_nccl.c"; rc=1; }
    grep "rank .: aborting the job" "$log" | sed 's/^/  /' | sort -u ;;
  *)
    "$BUILD/$(prog "$t")" > "$log" 2>&1
    rc=$? ;;
  esac
  set -e
  # the CUnit summary, the worst |err|/tol of each check (the maximum over its calls), the
  # train test's loss comparisons, and every message of the emulator or of a failed check
  [ "$t" = wmma ] || awk '/worst \|err\|\/tol =/ { n = $0; sub(/ *worst \|err\|\/tol = .*/, "", n); sub(/^ *Test: .*\.\.\. */, "", n); sub(/^ */, "", n); gsub(/ [^ ]*=[^ ]*/, "", n); gsub(/ [0-9]+x[0-9]+(x[0-9]+)?/, "", n);
         v = $NF + 0; if (!(n in w) || v > w[n]) w[n] = v; if (!(n in o)) o[n] = ++k; next }
       /Run Summary|suites|tests |asserts|Elapsed/ { sum = sum $0 "\n"; next }
       /cuda-emu|fatal|FAIL|differ|got |steps [0-9]|resume|skipped|Test: |^ok |^skip |train_gpu:/ { print }
       END { if (k) { printf "  worst |err|/tol per check (max over its calls and shapes):\n";
                      for (n in o) line[o[n]] = sprintf("    %-48s %.3f", n, w[n]);
                      for (i = 1; i <= k; i++) print line[i] }
             printf "%s", sum }' "$log" | sed 's/^  Test: \(.*\)\.\.\.\(.*\)$/  Test: \1... \2/' | head -120
  echo "-- exit status $rc ($(( $(date +%s) - start )) s), full log: $log"
  [ $rc -ne 0 ] && status=1
done
exit $status
