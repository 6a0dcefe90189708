#!/usr/bin/env bash
# Builds moet with the CUDA backend and packs the executables with the shared libraries they
# need (all but glibc and the CUDA driver / runtime / cuBLAS, which a GPU machine has) into one
# folder, for a GPU machine that lacks the Debian packages (MPI, HDF5, OpenBLAS, CUnit...).
#   bash launch/gpu-bundle.sh [ARCH] [OUT]      (ARCH 90 = H100/H200, default; OUT gpu-bundle)
# Then on the GPU machine: bash launch/gpu-check.sh OUT (or OUT.tar.gz, the same packed: about
# a third of the size, for tools that carry at most 64 MiB; OpenBLAS alone is 35 MB).
# BASE_REV=REV (a git revision) adds bin/moet-base, moet built at REV with the same options
# (in a worktree under BUILD-base), for launch/gpu-perf.sh's `base` variant: a change without
# an A/B switch timed against its baseline in the same run on the same GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${1:-90}
OUT=${2:-gpu-bundle}
BUILD=${BUILD:-build-cuda-sm$ARCH} # BUILD=DIR: an existing build folder of the same options
# without oneDNN (the CPU's bf16 GEMMs, 40 MB of library the GPU checks do not use)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMOET_CUDA=ON -DMOET_DNNL=OFF \
      -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target moet cuda_test_cuda_kernels cuda_test_cuda_gemm \
      cuda_test_cuda_moe_ops cuda_test_cuda_train cuda_test_nccl_comm
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib"
cp "$BUILD/moet" "$BUILD"/cuda_test_* "$OUT/bin/"
if [ -n "${BASE_REV:-}" ]; then
  SRC="$BUILD-base/src"
  git worktree remove --force "$SRC" 2>/dev/null || rm -rf "$SRC"
  git worktree add -f --detach "$SRC" "$BASE_REV" >/dev/null
  cmake -S "$SRC" -B "$BUILD-base/build" -DCMAKE_BUILD_TYPE=Release -DMOET_CUDA=ON \
        -DMOET_DNNL=OFF -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >/dev/null
  cmake --build "$BUILD-base/build" -j "$(nproc)" --target moet
  cp "$BUILD-base/build/moet" "$OUT/bin/moet-base"
  git -C "$SRC" log --oneline -1 --no-decorate | cut -c1-100 >"$OUT/base-rev.txt"
  git worktree remove --force "$SRC"
fi
# every non-system library of every executable (the CUDA libraries and glibc stay behind)
for exe in "$OUT"/bin/*; do
  ldd "$exe" | awk '/=> \//{print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libcuda.so*|libcudart*|\
      libcublas*|libnccl*|libstdc++*|libgcc_s*) ;;
      *) cp -nL "$lib" "$OUT/lib/" ;;
    esac
  done
done
strip --strip-unneeded "$OUT"/bin/* 2>/dev/null || true
tar czf "$OUT.tar.gz" "$OUT"
du -sh "$OUT" "$OUT.tar.gz"
