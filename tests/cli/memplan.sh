#!/usr/bin/env bash
# memplan: `moet info`'s memory and communication plan (train/memplan.c), and the plan against
# what a run measures.
#   (a) moet info --world/--ep prints the memory per rank by component and the per-step bytes;
#       tiny-moe's all-to-all and all-reduce bytes are the hand-computed ones below; --ep that
#       does not divide the experts, or a world the batch cannot be split over, exit 2;
#   (b) zero 1 shrinks the AdamW state and adds the all-gather; recompute full shrinks the
#       activations and adds the forward's exchanges again;
#   (c, d) mpirun -np 2 on cpu-shadow (the GPU code paths, with the backend's allocations
#       counted): (c) ep 2, zero 1, recompute full; (d) ep 1 with 2 micro-batches per rank
#       (the gradient accumulation buffer). The trainer's "memory: peak backend X MiB per rank
#       (predicted Y MiB)" line after step 1: Y is moet info's total, and X is within 2% of Y
#       (see below); metrics.jsonl's allreduce_bytes and allgather_bytes equal moet info's
#       bytes exactly in every step; alltoall_bytes is within the routing band (see below).
# Usage, from the repository root (ctest does this): bash tests/cli/memplan.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" memplan "$@"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1

# info NAME ARGS...: moet info configs/tiny-moe.ini ARGS into $tmp/NAME-info.out (beside the
# run of the same NAME, whose output is $tmp/NAME.out); sets rc
info() {
    local name=$1
    shift
    moet_np 1 60 "$name-info" info configs/tiny-moe.ini "$@"
}
# bytes NAME KIND: the exact byte count of the "KIND ... MB  (N bytes)" line of NAME's info
bytes() { sed -n "s/^$2 .*MB  (\([0-9]*\) bytes).*/\1/p" "$tmp/$1-info.out"; }
# mem NAME COMPONENT: the size column of a memory line ("25.1 MiB")
mem() { awk -v k="$2 " '/^# memory per rank/ { m = 1 } m && index($0, k) == 1 {
                           print substr($0, 24, 10); exit }' "$tmp/$1-info.out" | sed 's/^ *//'; }
mib() { awk '{ v = $1; if ($2 == "GiB") v *= 1024; print v }' <<<"$1"; }

# (a) tiny-moe: D = 64, L = 2, E = 8, top-2, 4 x 128 tokens per micro-batch, global batch 8.
# World 2, ep 2: one micro-batch per rank and step; R = 4 x 128 x 2 = 1024 rows of 256 bytes.
# All-to-all per layer: 4 x R rows (dispatch, combine, and both again in backward; balanced
# routing) + the 8 counts x 8 bytes: 2 x (4 x 1024 x 256 + 64) = 2097280.
# All-reduce: the shared tensors' elements, embed + lm_head 2 x 50304 x 64, per layer 4 norms
# x 64 + q, k, v, o 4 x 64 x 64 + router 8 x 64, final norm 64 = 6473280 floats = 25893120
# bytes (the experts: ep = world, nothing to reduce), + doubles: loss/ce/lb/z 4, loads 2 x 8,
# expert gradient norm 1, non-finite flag 1 = 176 bytes: 25893296.
info a --world 2 --ep 2
if [[ $rc -ne 0 ]]; then
    bad "a: moet info --world 2 --ep 2" "exit $rc"
elif ! grep -q '^# memory per rank (world 2, ep 2, zero 0, recompute none' "$tmp/a-info.out"; then
    bad "a: moet info --world 2 --ep 2" "no memory header with world 2, ep 2"
elif [[ $(sed -n '/^# memory per rank/,/^$/p' "$tmp/a-info.out" |
          grep -c '^parameters \|^gradients \|^AdamW state \|^activations \|^dispatch \|^total ') -ne 6 ]]
then
    bad "a: moet info --world 2 --ep 2" "the memory lines are not all there"
elif [[ $(bytes a all-to-all) != 2097280 || $(bytes a all-reduce) != 25893296 ]]; then
    bad "a: moet info --world 2 --ep 2" \
        "all-to-all $(bytes a all-to-all) / all-reduce $(bytes a all-reduce) bytes, want 2097280 / 25893296"
else
    ok "a: moet info --world 2 --ep 2: memory by component, all-to-all 2097280 B, all-reduce 25893296 B per step"
fi
info bad-ep --world 2 --ep 3
r1=$rc
info bad-world --world 3
if [[ $r1 -eq 2 && $rc -eq 2 ]] && grep -q 'global_batch' "$tmp/err"; then
    ok "a: --ep 3 (8 experts) and --world 3 (global batch 8 of 4-sequence micro-batches) exit 2"
else
    bad "a: bad --ep / --world" "exit $r1 / $rc, want 2 / 2"
fi

# (b) zero 1 on 4 ranks with ep 2 (micro-batches of 2 sequences): the all-gather line, a
# smaller AdamW state; recompute full: smaller activations, and the forward exchanges of layer 0
# again (+ 2 x 1024 x 256 + 64 B)
info z0 --world 4 --ep 2 --set train.micro_batch=2
info z1 --world 4 --ep 2 --set train.micro_batch=2 --set parallel.zero=1
r1=$rc
info rc --world 2 --ep 2 --set train.recompute=full
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "b: zero 1 / recompute full" "exit $r1 / $rc"
elif ! grep -q '^all-gather ' "$tmp/z1-info.out" || grep -q '^all-gather ' "$tmp/z0-info.out"; then
    bad "b: zero 1" "the all-gather line should be there with zero 1 only"
elif ! awk -v a="$(mib "$(mem z1 'AdamW state')")" -v b="$(mib "$(mem z0 'AdamW state')")" \
          'BEGIN { exit !(a < 0.6 * b) }'; then
    bad "b: zero 1" "AdamW state $(mem z1 'AdamW state') vs $(mem z0 'AdamW state') with zero 0"
elif ! awk -v a="$(mib "$(mem rc activations)")" -v b="$(mib "$(mem a activations)")" \
          'BEGIN { exit !(a < b) }'; then
    bad "b: recompute full" "activations $(mem rc activations) vs $(mem a activations)"
elif [[ $(bytes rc all-to-all) != $((2097280 + 2 * 1024 * 256 + 64)) ]]; then
    bad "b: recompute full" "all-to-all $(bytes rc all-to-all) bytes"
else
    ok "b: zero 1: AdamW $(mem z1 'AdamW state') (zero 0: $(mem z0 'AdamW state')) + all-gather; recompute full: activations $(mem rc activations), all-to-all +524352 B"
fi

# (c, d): measured against predicted
if ! command -v mpirun >/dev/null; then
    ok "c, d: skipped (no mpirun)"
    finish
    exit
fi
tokenize_sample
# run NAME ARGS...: 3 steps of tiny-moe on 2 cpu-shadow ranks into $tmp/NAME; sets rc
run() {
    local name=$1
    shift
    moet_np 2 240 "$name" train --config configs/tiny-moe.ini --set "data.train=$tmp/train/*.npy" \
        --set train.eval_every=0 --set train.max_steps=3 --set checkpoint.every=100 \
        --set train.device=cpu-shadow --set "checkpoint.dir=$tmp/$name" "$@"
}
# field NAME KEY: KEY's values in NAME's metrics.jsonl, one per step
field() { grep -o "\"$2\":[0-9.e+]*" "$tmp/$1/metrics.jsonl" | cut -d: -f2; }

# compare NAME INFO-ARGS... -- TRAIN-ARGS...: the run's measurements against moet info's plan.
# Memory: the trainer's peak backend bytes after step 1 within 2% of the plan. Everything the
# backend holds is planned exactly (parameters, gradients, accumulation buffer, moments or their
# shard, the activation arena) except the dispatcher's received rows (ep > 1), whose capacity,
# 1.5 x rows + 16, follows the rows rank 0 received in step 1; the plan takes balanced routing
# (R rows). The dispatcher is 3% of tiny-moe's total at ep 2 and rank 0 receives within +-25%
# of R in these steps (measured: +5% in step 1), so routing moves the peak by under 1%; 2% is margin
# and still catches any unplanned buffer from 3.7 MiB up (the smallest planned one, a copy of
# the shared gradients, is 25 MiB).
# All-to-all: half of the planned bytes is exact (this rank's own R rows sent out in dispatch
# and in backward, plus the counts); the other half sends back the rows this rank received,
# which routing decides. Rank 0 (the one that logs) holds experts 0..3 of 8 and receives its
# share of the group's top-2 assignments: 1.05, 1.09 and 1.12 x R in steps 1..3 of run (c)
# (the runs are deterministic: the same data and bits every time). The band: the received half
# within 25% of R, i.e. each step's total within 12.5% of the plan, twice what routing moves
# it here, and an exchange missing or doubled in every layer (20% of the total) still fails.
compare() {
    local name=$1 what=$2 info_args=() train_args=()
    shift 2
    while [[ $1 != -- ]]; do info_args+=("$1"); shift; done
    shift
    train_args=("$@")
    info "$name" --set train.device=cpu-shadow "${info_args[@]}"
    [[ $rc -ne 0 ]] && { bad "$what" "moet info exit $rc"; return; }
    run "$name" "${train_args[@]}"
    [[ $rc -ne 0 ]] && { bad "$what" "moet train exit $rc"; return; }
    local line peak pred total ar ag a2a
    line=$(grep '^memory: peak backend' "$tmp/$name.out")
    [[ -z $line ]] && { bad "$what" "no 'memory: peak backend' line after step 1"; return; }
    peak=$(sed 's/.*backend \([0-9.]*\) MiB.*/\1/' <<<"$line")
    pred=$(sed 's/.*predicted \([0-9.]*\) MiB.*/\1/' <<<"$line")
    total=$(mem "$name" total)
    if [[ "$pred MiB" != "$total" ]]; then
        bad "$what" "the trainer predicts $pred MiB, moet info says $total"
        return
    fi
    if ! awk -v p="$peak" -v q="$pred" 'BEGIN { d = p - q; if (d < 0) d = -d; exit !(d <= 0.02 * q) }'
    then
        bad "$what" "peak backend $peak MiB, predicted $pred MiB (more than 2% apart)"
        return
    fi
    ar=$(bytes "$name" all-reduce)
    if [[ $(field "$name" allreduce_bytes | sort -u) != "$ar" ]]; then
        bad "$what" "allreduce_bytes $(field "$name" allreduce_bytes | tr '\n' ' ')want $ar"
        return
    fi
    ag=$(bytes "$name" all-gather)
    if [[ $(field "$name" allgather_bytes | sort -u) != "$ag" ]]; then
        bad "$what" "allgather_bytes $(field "$name" allgather_bytes | tr '\n' ' ')want ${ag:-none}"
        return
    fi
    a2a=$(bytes "$name" all-to-all)
    local got
    for got in $(field "$name" alltoall_bytes); do
        if ! awk -v g="$got" -v p="$a2a" 'BEGIN { d = g - p; if (d < 0) d = -d; exit !(d <= 0.125 * p) }'
        then
            bad "$what" "alltoall_bytes $got, predicted $a2a (more than 12.5% apart)"
            return
        fi
    done
    ok "$what: peak $peak MiB (predicted $pred); allreduce $ar B${ag:+, allgather $ag B} exact; alltoall $(field "$name" alltoall_bytes | tr '\n' ' ')B vs $a2a B"
}

compare c "c: np 2, ep 2, zero 1, recompute full" \
    --world 2 --ep 2 --set parallel.zero=1 --set train.recompute=full -- \
    --set parallel.ep=2 --set parallel.zero=1 --set train.recompute=full
compare d "d: np 2, ep 1, 2 micro-batches per step" \
    --world 2 --set train.global_batch=16 -- --set train.global_batch=16

finish
