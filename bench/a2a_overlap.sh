#!/usr/bin/env bash
# a2a_overlap: the MoE backward's overlap of the input-gradient all-to-all with the expert weight
# gradients ([parallel] a2a_overlap), measured: `moet train` on configs/bench-cpu-moe.ini with
# ep 2 over 2 ranks (mpirun, TCP), overlap on and off in alternation, REPS runs each of STEPS
# steps; prints the median step time (steps after the first) and the time inside all-to-alls.
# Usage: bash bench/a2a_overlap.sh BUILD_DIR [STEPS] [REPS]   (data: the bundled sample, tokenized)
set -euo pipefail
BUILD=${1:?usage: bench/a2a_overlap.sh BUILD_DIR [STEPS] [REPS]}
STEPS=${2:-6}
REPS=${3:-2}
MOET=$BUILD/moet
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tmp=$(mktemp -d /tmp/moet-a2a.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
"$MOET" tokenize --quiet --tokenizer data/tokenizers/gpt-neox-olmo-dolma-v1_5.json \
    --out "$tmp/train" data/sample/documents/train.jsonl.gz >/dev/null
run() { # NAME OVERLAP
    mpirun -np 2 --oversubscribe --mca btl tcp,self -x OMP_NUM_THREADS "$MOET" train \
        --config configs/bench-cpu-moe.ini --set "data.train=$tmp/train/*.npy" \
        --set parallel.ep=2 --set parallel.comm=mpi --set train.micro_batch=4 \
        --set train.max_steps="$STEPS" --set checkpoint.every=1000000 \
        --set "checkpoint.dir=$tmp/$1" --set parallel.a2a_overlap="$2" >"$tmp/$1.log" 2>&1
    # step seconds = tokens per step / tok/s; a2a ms from the comm field (after the first step)
    awk '/^step /{ for (i = 1; i <= NF; i++) { if ($(i+1) == "tok/s") ts = $i; if ($i == "a2a") am = $(i+3) }
                   n++; if (n > 1) print 4096 / ts, am }' "$tmp/$1.log" >>"$tmp/$2.txt"
}
for r in $(seq "$REPS"); do run "on$r" true; run "off$r" false; done
med() { sort -n | awk '{a[NR] = $1} END {print (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2)}'; }
echo "a2a_overlap: bench-cpu-moe, ep 2 on 2 ranks x $OMP_NUM_THREADS thread(s), micro_batch 4," \
     "$REPS x $STEPS steps each (first step of each run dropped)"
printf "%-10s %14s %18s\n" overlap "step s (median)" "in a2a ms (median)"
for o in true false; do
    printf "%-10s %14.3f %18.0f\n" "$o" "$(cut -d' ' -f1 "$tmp/$o.txt" | med)" \
        "$(cut -d' ' -f2 "$tmp/$o.txt" | sed 's/ms//' | med)"
done
