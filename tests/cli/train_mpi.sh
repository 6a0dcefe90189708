#!/usr/bin/env bash
# train_mpi: data-parallel `moet train` under real mpirun (Open MPI's TCP transport, as between
# nodes): (a) world 2 with accumulation 1 logs the bit-identical losses of world 1 with
# accumulation 2 (rank-order gradient sums, ARCHITECTURE §4); (b) a world-1 checkpoint resumed
# on 2 ranks continues with the losses of the uninterrupted world-1 run; (c) ep 2 trains like
# ep 1, and its parallel-HDF5 checkpoint verifies and resumes on 1 or 2 ranks; (d) a rank that fails
# (killed) ends every rank with a non-zero status within 60 s, not a hang; (e) an ep-4 checkpoint
# holds exactly the tensors of ep 1; (f, g) resume 4 ranks -> 1 and 2 -> 4 continues the curve.
# Usage, from the repository root (ctest does this): bash tests/cli/train_mpi.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" train_mpi "$@"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
MPIRUN=(mpirun -np 2 --oversubscribe --mca btl tcp,self -x OMP_NUM_THREADS)
tokenize_sample

# run NP RUN ARGS...: moet train on tiny-moe (global batch 8 = 2 micro-batches of 4) with NP
# ranks (1: no mpirun), output in $tmp/RUN; sets rc.
run() {
    local np=$1 name=$2
    shift 2
    moet_np "$np" 240 "$name" train --config configs/tiny-moe.ini \
        --set "data.train=$tmp/train/*.npy" --set "data.valid=$tmp/valid/*.npy" \
        --set train.eval_every=0 --set "checkpoint.dir=$tmp/$name" "$@"
}

# (a) world 2 x accumulation 1 == world 1 x accumulation 2, bit for bit
run 1 w1 --set train.max_steps=6 --set checkpoint.every=3
r1=$rc
run 2 w2 --set train.max_steps=6 --set checkpoint.every=3
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "a: world 1 and world 2 runs" "exit $r1 / $rc"
elif [[ $(losses w1 | wc -l) -ne 6 ]]; then
    bad "a: world 1 run" "expected 6 logged steps"
elif ! diff <(losses w1) <(losses w2) >/dev/null; then
    bad "a: world 2 accum 1 vs world 1 accum 2" "$(diff <(losses w1) <(losses w2) | head -4)"
else
    ok "a: world 2 x accum 1 logs the bit-identical losses of world 1 x accum 2 (6 steps)"
fi

# (b) resume the world-1 step-3 checkpoint on 2 ranks: steps 4..6 as in the world-1 run
mkdir -p "$tmp/b" && cp "$tmp/w1/step00000003.h5" "$tmp/b/"
ln -s step00000003.h5 "$tmp/b/latest.h5"
run 2 b --set train.max_steps=6 --set checkpoint.every=3 --resume latest
if [[ $rc -ne 0 ]]; then
    bad "b: resume on 2 ranks" "exit $rc"
elif ! diff <(losses w1 | tail -n 3) <(losses b) >/dev/null; then
    bad "b: resume on 2 ranks" "$(diff <(losses w1 | tail -n 3) <(losses b) | head -4)"
else
    ok "b: a world-1 checkpoint resumed on 2 ranks continues bit-identically (steps 4..6)"
fi

# (c) expert parallelism: ep 2 on 2 ranks logs the losses of ep 1 on 2 ranks (run a) within a
# relative 1e-6; its step-3 checkpoint, written collectively with parallel HDF5, passes
# `inspect --verify` and resumes on 1 rank (ep 1) and on 2 ranks (ep 2) with those losses.
# Why a tolerance: the expert gradients are summed in another order (all-to-all then local,
# not rank order), so the fp32 bits differ (~1e-7 relative per element); over 6 steps the losses
# differ by ~1e-10 relative here. 1e-6 leaves 4 orders of margin and still sits far below what
# a wrong gradient does (the loss moves ~1e-4 relative per step).
# close A B: the losses of runs A and B agree step by step (same steps, relative 1e-6)
close() {
    awk -F'[:,]' 'NR == FNR { a[$2] = $6; next }
                  { n++; if (!($2 in a)) exit 1
                    d = a[$2] - $6; if (d < 0) d = -d
                    if (d > 1e-6 * ($6 < 0 ? -$6 : $6)) { print "step " $2 ": " a[$2] " vs " $6; exit 1 } }
                  END { if (n == 0) exit 1 }' <(losses "$1") <(losses "$2")
}
run 2 c --set train.max_steps=6 --set checkpoint.every=3 --set parallel.ep=2
if [[ $rc -ne 0 ]]; then
    bad "c: ep 2 on 2 ranks" "exit $rc"
elif [[ $(losses c | wc -l) -ne 6 ]]; then
    bad "c: ep 2 on 2 ranks" "expected 6 logged steps"
elif ! close w2 c >"$tmp/err"; then
    bad "c: ep 2 vs ep 1 on 2 ranks" "losses differ"
else
    ok "c: ep 2 on 2 ranks logs the losses of ep 1 (relative 1e-6, 6 steps)"
fi
if "$MOET" inspect --verify "$tmp/c/step00000003.h5" >"$tmp/c.verify" 2>"$tmp/err"; then
    ok "c: the collectively written ep-2 checkpoint passes inspect --verify"
else
    bad "c: inspect --verify of the ep-2 checkpoint" "exit $?"
fi
for np in 1 2; do
    mkdir -p "$tmp/c$np" && cp "$tmp/c/step00000003.h5" "$tmp/c$np/"
    ln -s step00000003.h5 "$tmp/c$np/latest.h5"
    run "$np" "c$np" --set train.max_steps=6 --set checkpoint.every=3 --set "parallel.ep=$np" \
        --resume latest
    if [[ $rc -ne 0 ]]; then
        bad "c: resume the ep-2 checkpoint on $np rank(s), ep $np" "exit $rc"
    elif [[ $(losses "c$np" | wc -l) -ne 3 ]] || ! close w2 "c$np" >"$tmp/err"; then
        bad "c: resume the ep-2 checkpoint on $np rank(s), ep $np" "losses differ"
    else
        ok "c: the ep-2 checkpoint resumed on $np rank(s) (ep $np) continues (steps 4..6)"
    fi
done

# (d) a rank killed mid-run (as by the OOM killer): the job must end non-zero on every rank,
# not hang, with mpirun naming the dead rank
( timeout 240 "${MPIRUN[@]}" "$MOET" train --config configs/tiny-moe.ini \
    --set "data.train=$tmp/train/*.npy" --set train.eval_every=0 --set train.max_steps=100000 \
    --set "checkpoint.dir=$tmp/d" >"$tmp/d.out" 2>"$tmp/err"; echo $? >"$tmp/d.rc" ) &
job=$!
for _ in $(seq 1 120); do
    [[ -s $tmp/d/metrics.jsonl ]] && break
    sleep 0.5
done
victim=$(pgrep -n -f -- "--set checkpoint.dir=$tmp/d" | head -n 1)
start=$(date +%s)
[[ -n $victim ]] && kill -KILL "$victim"
wait "$job"
took=$(($(date +%s) - start))
rc=$(cat "$tmp/d.rc" 2>/dev/null || echo missing)
if [[ -n $victim && $rc != 0 && $rc != 124 && $took -lt 60 ]]; then
    ok "d: a killed rank ends the whole job (exit $rc after ${took}s)"
else
    bad "d: killed rank" "victim '${victim}', exit $rc after ${took}s"
fi

# (e) a checkpoint written with ep 4 on 4 ranks holds exactly the tensors of the ep 1 run: with
# lr 0 the weights stay at their (layout-independent) init, so every /model dataset must have
# the same name, shape and checksum (crc32 of the whole dataset, combined across the writers)
G=(--set train.global_batch=16)
run 4 e4 "${G[@]}" --set train.max_steps=2 --set checkpoint.every=2 --set parallel.ep=4 \
    --set optim.lr=0 --set optim.min_lr=0
r4=$rc
run 4 e1 "${G[@]}" --set train.max_steps=2 --set checkpoint.every=2 --set optim.lr=0 \
    --set optim.min_lr=0
if [[ $r4 -ne 0 || $rc -ne 0 ]]; then
    bad "e: ep 4 / ep 1 runs on 4 ranks" "exit $r4 / $rc"
else
    "$MOET" inspect "$tmp/e4" | grep '^  model/' >"$tmp/e4.t"
    "$MOET" inspect "$tmp/e1" | grep '^  model/' >"$tmp/e1.t"
    if [[ $(wc -l <"$tmp/e4.t") -eq 27 ]] && cmp -s "$tmp/e4.t" "$tmp/e1.t"; then
        ok "e: the ep-4 checkpoint holds exactly the tensors of ep 1 (27 names, shapes, CRCs)"
    else
        bad "e: ep 4 vs ep 1 checkpoint tensors" "$(diff "$tmp/e4.t" "$tmp/e1.t" | head -3)"
    fi
fi

# resumed RUN_FROM NP_TO NAME ARGS...: copy RUN_FROM's step-3 checkpoint into a new run NAME and
# resume it on NP_TO ranks to step 6
resumed() {
    local from=$1 np=$2 name=$3
    shift 3
    mkdir -p "$tmp/$name" && cp "$tmp/$from/step00000003.h5" "$tmp/$name/"
    ln -sf step00000003.h5 "$tmp/$name/latest.h5"
    run "$np" "$name" "${G[@]}" --set train.max_steps=6 --set checkpoint.every=3 "$@" \
        --resume latest
}
# (f) 4 ranks (ep 4) -> 1 rank, (g) 2 ranks (ep 2) -> 4 ranks (ep 4): the resumed runs continue
# the uninterrupted runs' loss curves within the ep tolerance above (relative 1e-6)
run 4 f4 "${G[@]}" --set train.max_steps=6 --set checkpoint.every=3 --set parallel.ep=4
if [[ $rc -ne 0 ]]; then
    bad "f: 4 ranks ep 4" "exit $rc"
else
    resumed f4 1 f1
    if [[ $rc -eq 0 ]] && close f4 f1 >"$tmp/err"; then
        ok "f: an ep-4 checkpoint of 4 ranks resumed on 1 rank continues the loss curve"
    else
        bad "f: resume 4 -> 1" "exit $rc"
    fi
fi
run 2 g2 "${G[@]}" --set train.max_steps=6 --set checkpoint.every=3 --set parallel.ep=2
if [[ $rc -ne 0 ]]; then
    bad "g: 2 ranks ep 2" "exit $rc"
else
    resumed g2 4 g4 --set parallel.ep=4
    if [[ $rc -eq 0 ]] && close g2 g4 >"$tmp/err"; then
        ok "g: an ep-2 checkpoint of 2 ranks resumed on 4 ranks (ep 4) continues the loss curve"
    else
        bad "g: resume 2 -> 4" "exit $rc"
    fi
fi

finish
