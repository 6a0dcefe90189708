#!/usr/bin/env bash
# train_mpi: data-parallel `moet train` under real mpirun (Open MPI's TCP transport, as between
# nodes): (a) world 2 with accumulation 1 logs the bit-identical losses of world 1 with
# accumulation 2 (rank-order gradient sums, ARCHITECTURE §4); (b) a world-1 checkpoint resumed
# on 2 ranks continues with the losses of the uninterrupted world-1 run; (c) ep > 1 in training
# is refused with exit 2 until the parallel checkpoint writer exists; (d) a rank that fails
# (killed) ends every rank with a non-zero status within 60 s, not a hang.
# Usage, from the repository root (ctest does this): bash tests/cli/train_mpi.sh PATH/TO/moet
set -u

MOET=${1:?usage: bash tests/cli/train_mpi.sh PATH/TO/moet}
TOK=data/tokenizers/gpt-neox-olmo-dolma-v1_5.json
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
MPIRUN=(mpirun -np 2 --oversubscribe --mca btl tcp,self -x OMP_NUM_THREADS)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moet-train-mpi.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() {
    echo "FAIL $1: $2"
    [[ -f $tmp/err ]] && sed 's/^/     | /' "$tmp/err" | tail -n 8
    failed=$((failed + 1))
}

for split in train valid; do
    "$MOET" tokenize --quiet --tokenizer "$TOK" --out "$tmp/$split" \
        "data/sample/documents/$split.jsonl.gz" >/dev/null 2>"$tmp/err" || {
        echo "train_mpi: tokenizing the $split sample failed" >&2
        cat "$tmp/err" >&2
        exit 1
    }
done

# run NP RUN ARGS...: moet train on tiny-moe (global batch 8 = 2 micro-batches of 4) with NP
# ranks (1: no mpirun), output in $tmp/RUN; sets rc.
run() {
    local np=$1 name=$2
    shift 2
    local cmd=("$MOET")
    [[ $np -gt 1 ]] && cmd=("${MPIRUN[@]}" "$MOET")
    rc=0
    timeout 240 "${cmd[@]}" train --config configs/tiny-moe.ini \
        --set "data.train=$tmp/train/*.npy" --set "data.valid=$tmp/valid/*.npy" \
        --set train.eval_every=0 --set "checkpoint.dir=$tmp/$name" "$@" \
        >"$tmp/$name.out" 2>"$tmp/err" || rc=$?
}
# losses RUN: the "loss" fields of RUN's metrics.jsonl, as written (%.17g)
losses() { grep -o '"step":[0-9]*,"tokens":[0-9]*,"loss":[^,]*' "$tmp/$1/metrics.jsonl"; }

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

# (c) expert-parallel training is refused (exit 2) until checkpoints are written in parallel
run 2 c --set train.max_steps=2 --set parallel.ep=2
if [[ $rc -ne 0 ]] && grep -q "ep = 2" "$tmp/err"; then
    ok "c: ep = 2 in training is refused with a message (exit $rc)"
else
    bad "c: ep = 2" "exit $rc"
fi

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

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
