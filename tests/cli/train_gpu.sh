#!/usr/bin/env bash
# train_gpu: multi-rank `moet train` on GPUs (ARCHITECTURE §4; device = cuda), the checks of the
# NCCL transport and the memory options. Skipped (exit 77) where no GPU is visible; in CI it
# runs under the host emulation of CUDA and NCCL (tools/cuda-emu/run.sh train_gpu, one emulated
# GPU per rank). Checks, each on tiny-moe, 4 steps:
# (a) mpirun -np 2 with comm = mpi (device buffers staged through the host; the ranks may share
#     one GPU) logs the losses of -np 1 with accumulation 2, bit for bit;
# (b) a one-rank NCCL run logs the losses of the one-rank MPI run, bit for bit;
# (c) ZeRO-1 on 2 ranks logs the losses of zero 0, bit for bit;
# (d) with a GPU per rank: comm = nccl on 2 ranks logs the losses of comm = mpi (a + b is exact
#     in any order), also with ep 2 (the expert rows over NCCL, overlapped backward) against
#     ep 2 over MPI; ep 2 against ep 1 to a relative 1e-4 (expert gradients summed in another
#     order).
# Usage, from the repository root: bash tests/cli/train_gpu.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" train_gpu "$@"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
# GPUs: nvidia-smi, or the emulator's EMU_DEVICES
gpus=${EMU_DEVICES:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
gpus=${gpus:-0}
if [[ $gpus -eq 0 ]]; then
    echo "train_gpu: skipped (no GPU visible)"
    exit 77
fi
have_mpirun=1
command -v mpirun >/dev/null || have_mpirun=0
tokenize_sample
# a short slice of the sample keeps the emulated runs short
mkdir -p "$tmp/small" && cp "$tmp"/train/*.npy "$tmp/small/"

# run NP RUN ARGS...: 4 steps of tiny-moe on cuda (global batch 4 = 2 micro-batches of 2), NP
# ranks (1: no mpirun), output in $tmp/RUN; sets rc.
run() {
    local np=$1 name=$2
    shift 2
    local cmd=("$MOET")
    [[ $np -gt 1 ]] && cmd=(mpirun -np "$np" --oversubscribe --mca btl tcp,self
                            -x OMP_NUM_THREADS -x EMU_DEVICES "$MOET")
    rc=0
    timeout 900 "${cmd[@]}" train --config configs/tiny-moe.ini \
        --set "data.train=$tmp/small/*.npy" --set train.eval_every=0 --set train.device=cuda \
        --set train.seq_len=64 --set train.micro_batch=2 --set train.global_batch=4 \
        --set train.max_steps=4 --set checkpoint.every=1000 --set "checkpoint.dir=$tmp/$name" \
        "$@" >"$tmp/$name.out" 2>"$tmp/err" || rc=$?
}
close() { # NAME A B RTOL: B's losses equal A's to a relative RTOL
    local w
    if [[ $(losses "$3" | wc -l) -ne 4 ]]; then bad "$1" "expected 4 logged steps from $3"; return; fi
    w=$(paste <(losses "$2" | sed 's/.*"loss"://') <(losses "$3" | sed 's/.*"loss"://') |
        awk -v t="$4" '{ d = $1 - $2; if (d < 0) d = -d; r = d / $1; if (r > m) m = r }
                       END { printf "%.2e %s", m, (m <= t ? "ok" : "bad") }')
    if [[ $w == *ok ]]; then ok "$1 (worst relative difference ${w% *})"
    else bad "$1" "worst relative difference ${w% *} > $4"
    fi
}

run 1 one --set parallel.comm=mpi
r1=$rc
[[ $have_mpirun -eq 1 ]] && run 2 two --set parallel.comm=mpi
if [[ $have_mpirun -eq 0 ]]; then
    echo "skip a, c, d: no mpirun on this machine (the one-rank checks run)"
elif [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "a: np 1 / np 2 on cuda over MPI" "exit $r1 / $rc"
else
    same "a: mpirun -np 2 on cuda, comm = mpi (staged) logs the losses of -np 1 x accumulation 2 bit for bit" one two
fi

run 1 onenccl --set parallel.comm=nccl
if [[ $rc -ne 0 ]]; then bad "b: one rank with comm = nccl" "exit $rc"
else same "b: a one-rank NCCL run logs the losses of the one-rank MPI run bit for bit" one onenccl
fi

if [[ $have_mpirun -eq 1 ]]; then
    run 2 zero --set parallel.comm=mpi --set parallel.zero=1
    if [[ $rc -ne 0 ]]; then bad "c: ZeRO-1 on 2 ranks" "exit $rc"
    else same "c: ZeRO-1 on 2 ranks (cuda) logs the losses of zero 0 bit for bit" two zero
    fi
fi

if [[ $have_mpirun -eq 0 ]]; then
    :
elif [[ $gpus -lt 2 ]]; then
    echo "skip d: NCCL on 2 ranks needs a GPU per rank ($gpus visible)"
else
    run 2 twonccl --set parallel.comm=nccl
    if [[ $rc -ne 0 ]]; then bad "d: 2 ranks with comm = nccl" "exit $rc"
    elif ! grep -q "gradients over nccl" "$tmp/twonccl.out"; then
        bad "d: 2 ranks with comm = nccl" "the log does not say nccl: $(grep buckets "$tmp/twonccl.out")"
    else same "d: comm = nccl on 2 ranks logs the losses of comm = mpi bit for bit" two twonccl
    fi
    run 2 ep2mpi --set parallel.comm=mpi --set parallel.ep=2
    r1=$rc
    run 2 ep2nccl --set parallel.comm=nccl --set parallel.ep=2 --set parallel.zero=1
    if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
        bad "d: ep 2 over mpi / nccl" "exit $r1 / $rc"
    else
        same "d: ep 2 with zero 1 over NCCL logs the losses of ep 2 over MPI bit for bit" ep2mpi ep2nccl
        close "d: ep 2 on cuda logs the losses of ep 1" two ep2nccl 1e-4
    fi
fi
finish
