#!/usr/bin/env bash
# train_parallel: the options of multi-rank training under real mpirun (ARCHITECTURE §4):
# (a) gradient buckets: 1 MB buckets (many all-reduces started during backward) log the losses
#     of one 64 MB bucket bit for bit;
# (b) ZeRO-1 (parallel.zero = 1) logs the losses of zero = 0 bit for bit; its checkpoint holds
#     the full AdamW moments: it verifies, and resumes with zero = 0 on 2 ranks and on 1 rank;
# (c) ZeRO-1 with ep 2 on 4 ranks (experts sharded over the expert-DP pairs) equals zero = 0;
# (d) expert parallelism on device memory (cpu-shadow: the GPU code paths, device buffers staged
#     through the host over MPI) logs the losses of ep 2 on cpu bit for bit, also with zero 1 and
#     recompute full (one layer's dispatcher rows); a2a_overlap off changes no bit;
# (e) a rank that stops responding (MOET_DEBUG_STALL: at a step start, or inside a step) ends the job through a
#     watchdog ([parallel] timeout_s), with a message naming the rank and the collective or phase.
# Usage, from the repository root (ctest does this): bash tests/cli/train_parallel.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" train_parallel "$@"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
tokenize_sample

# run NP RUN ARGS...: moet train on tiny-moe (global batch 8), 6 steps, a checkpoint at step 3,
# with NP ranks (1: no mpirun), output in $tmp/RUN; sets rc.
run() {
    local np=$1 name=$2
    shift 2
    moet_np "$np" 240 "$name" train --config configs/tiny-moe.ini \
        --set "data.train=$tmp/train/*.npy" --set train.eval_every=0 \
        --set train.max_steps=6 --set checkpoint.every=3 --set "checkpoint.dir=$tmp/$name" "$@"
}
export MOET_DEBUG_STALL=

# (a) buckets
run 2 b64
r1=$rc
run 2 b1 --set parallel.bucket_mb=1
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "a: bucket runs" "exit $r1 / $rc"
elif ! grep -q "in [0-9][0-9]* buckets" "$tmp/b1.out" || grep -q "in 1 buckets" "$tmp/b1.out"; then
    bad "a: 1 MB buckets" "expected several buckets: $(grep buckets "$tmp/b1.out")"
else
    same "a: $(grep -o 'in [0-9]* buckets' "$tmp/b1.out") of 1 MB log the losses of one 64 MB bucket bit for bit" b64 b1
fi

# (b) ZeRO-1 on 2 ranks, its checkpoint, resumed without ZeRO on 2 and on 1 rank
run 2 z1 --set parallel.zero=1
if [[ $rc -ne 0 ]]; then
    bad "b: zero 1" "exit $rc"
elif ! grep -q "^ZeRO-1: this rank keeps the AdamW moments of" "$tmp/z1.out"; then
    bad "b: zero 1" "no ZeRO-1 line in the log"
else
    same "b: ZeRO-1 logs the losses of zero 0 bit for bit (6 steps, 2 ranks)" b64 z1
    if ! "$MOET" inspect "$tmp/z1/step00000003.h5" --verify >"$tmp/err" 2>&1; then
        bad "b: the ZeRO-1 checkpoint verifies" "inspect --verify failed"
    else
        for np in 2 1; do
            mkdir -p "$tmp/zr$np" && cp "$tmp/z1/step00000003.h5" "$tmp/zr$np/"
            ln -s step00000003.h5 "$tmp/zr$np/latest.h5"
            run "$np" "zr$np" --resume latest
            if [[ $rc -ne 0 ]]; then bad "b: resume the ZeRO-1 checkpoint on $np ranks" "exit $rc"
            else same "b: the ZeRO-1 step-3 checkpoint resumed with zero 0 on $np rank(s) continues bit for bit" b64 "zr$np" 3
            fi
        done
        # and the other way: a zero-0 checkpoint resumed with ZeRO-1
        mkdir -p "$tmp/zr0" && cp "$tmp/b64/step00000003.h5" "$tmp/zr0/"
        ln -s step00000003.h5 "$tmp/zr0/latest.h5"
        run 2 zr0 --resume latest --set parallel.zero=1
        if [[ $rc -ne 0 ]]; then bad "b: resume a zero-0 checkpoint with ZeRO-1" "exit $rc"
        else same "b: a zero-0 checkpoint resumed with ZeRO-1 continues bit for bit" b64 zr0 3
        fi
    fi
fi

# (c) ZeRO-1 with ep 2 on 4 ranks: the experts' moments are split over the expert-DP pairs
run 4 e4z0 --set parallel.ep=2 --set train.micro_batch=2
r1=$rc
run 4 e4z1 --set parallel.ep=2 --set train.micro_batch=2 --set parallel.zero=1
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "c: ep 2 on 4 ranks, zero 0 / 1" "exit $r1 / $rc"
else
    same "c: ZeRO-1 with ep 2 on 4 ranks logs the losses of zero 0 bit for bit" e4z0 e4z1
    # its checkpoint (moments gathered over the world and the expert-DP pairs) resumes without
    mkdir -p "$tmp/e4r" && cp "$tmp/e4z1/step00000003.h5" "$tmp/e4r/"
    ln -s step00000003.h5 "$tmp/e4r/latest.h5"
    run 4 e4r --set parallel.ep=2 --set train.micro_batch=2 --resume latest
    if [[ $rc -ne 0 ]]; then bad "c: resume the ep-2 ZeRO-1 checkpoint with zero 0" "exit $rc"
    else same "c: the ep-2 ZeRO-1 step-3 checkpoint resumed with zero 0 continues bit for bit" e4z0 e4r 3
    fi
fi

# (d) expert parallelism on device memory: cpu-shadow equals cpu (and the backward's all-to-all
# overlap with the weight gradients changes no bit)
run 2 ep2cpu --set parallel.ep=2
r1=$rc
run 2 ep2seq --set parallel.ep=2 --set parallel.a2a_overlap=false
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "d: ep 2 with a2a_overlap true / false" "exit $r1 / $rc"
else
    same "d: ep 2: a2a_overlap = false logs the losses of the overlapped backward bit for bit" ep2cpu ep2seq
fi
run 2 ep2sh --set parallel.ep=2 --set train.device=cpu-shadow
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "d: ep 2 on cpu / cpu-shadow" "exit $r1 / $rc"
elif ! grep -q "expert rows over mpi-staged" "$tmp/ep2sh.out"; then
    bad "d: ep 2 on cpu-shadow" "expected the rows staged over MPI: $(grep buckets "$tmp/ep2sh.out")"
else
    same "d: ep 2 on cpu-shadow (device rows staged over MPI) logs the losses of cpu bit for bit" ep2cpu ep2sh
fi
run 2 ep2shzr --set parallel.ep=2 --set train.device=cpu-shadow --set parallel.zero=1 \
    --set train.recompute=full
if [[ $rc -ne 0 ]]; then
    bad "d: ep 2 on cpu-shadow with zero 1 and recompute full" "exit $rc"
else
    same "d: ep 2 on cpu-shadow with zero 1 and recompute full logs the same losses" ep2cpu ep2shzr
fi

# (e) a stalled rank: a watchdog ends the job.
# stalled NAME WHERE PATTERN: rank 1 stalls at step 3 (MOET_DEBUG_STALL=1:3:WHERE) with a 3 s
# timeout; the job must end non-zero (not by the test's timeout) with a message matching PATTERN
stalled() {
    local t0=$(date +%s) dt
    MOET_DEBUG_STALL=1:3:$2 run 2 "stall_$2" --set parallel.timeout_s=3
    dt=$(( $(date +%s) - t0 ))
    if [[ $rc -eq 0 || $rc -eq 124 ]]; then
        bad "$1" "exit $rc after $dt s (expected a non-zero exit, not the timeout)"
    elif ! grep -Eq "$3" "$tmp/err"; then
        bad "$1" "no watchdog message matching: $3"
    else
        ok "$1: the job ended after $dt s (exit $rc): $(grep -m1 'has not finished' "$tmp/err" | cut -c1-80)..."
    fi
}
stalled "e: rank 1 stalled at the start of step 3, rank 0's watchdog" start \
    "rank 0: all-reduce \(sum\) on the world \(2 ranks\) has not finished after 3 s"
# between forward and backward, outside any collective: rank 1's phase watch or rank 0's
stalled "e: rank 1 stalled inside step 3" backward \
    "rank 1: forward \+ backward of a micro-batch on the world \(2 ranks\) has not finished after 3 s|rank 0: all-reduce \(sum\) on the world \(2 ranks\) has not finished after 3 s"
finish
