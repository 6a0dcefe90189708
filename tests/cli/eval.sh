#!/usr/bin/env bash
# eval: `moet eval CKPT --data GLOB`: (a) on the validation shards with the trainer's batch count
# it gives the trainer's val_loss at that step bit for bit; (b) on cpu-shadow (the GPU code
# paths) the same bits; (c) a whole pass and another micro-batch size (--set) give a finite
# loss and the text line; (d) bad usage exits 2, a missing checkpoint 1, naming it.
# Usage, from the repository root (ctest does this): bash tests/cli/eval.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" eval "$@"
tokenize_sample

"$MOET" train --config configs/tiny-moe.ini --set "data.train=$tmp/train/*.npy" \
    --set "data.valid=$tmp/valid/*.npy" --set train.max_steps=4 --set train.eval_every=4 \
    --set train.eval_batches=3 --set "checkpoint.dir=$tmp/run" >"$tmp/train.out" 2>"$tmp/err" ||
    { bad "train tiny-moe 4 steps" "exit $?"; finish; exit 1; }
want=$(grep -o '"step":4,"val_loss":[^,]*' "$tmp/run/metrics.jsonl" | sed 's/.*://')

# (a), (b)
for dev in cpu cpu-shadow; do
    if ! "$MOET" eval "$tmp/run" --data "$tmp/valid/*.npy" --batches 3 --json \
        --set train.device=$dev >"$tmp/eval.json" 2>"$tmp/err"; then
        bad "a: eval on $dev" "exit status $?"
        continue
    fi
    got=$(grep -o '"loss":[^,]*' "$tmp/eval.json" | sed 's/.*://')
    if [[ -n $want && $got == "$want" ]]; then
        ok "a: eval on $dev, 3 micro-batches of the valid shards: loss $got = the trainer's val_loss at step 4"
    else
        bad "a: eval on $dev" "loss '$got', the trainer's val_loss '$want'"
    fi
done

# (c) the whole data set once, and micro-batches of 2 sequences
if "$MOET" eval "$tmp/run/step00000004.h5" --data "$tmp/valid/*.npy" >"$tmp/eval.txt" 2>"$tmp/err" &&
   grep -Eq "^eval .*: [0-9]+ micro-batches x 4 x 128 tokens \(cpu\) \| loss [0-9.]+ \| ppl [0-9.]+" "$tmp/eval.txt" &&
   "$MOET" eval "$tmp/run" --data "$tmp/valid/*.npy" --set train.micro_batch=2 --batches 5 \
       >"$tmp/eval2.txt" 2>"$tmp/err" && grep -q "5 micro-batches x 2 x 128 tokens" "$tmp/eval2.txt"; then
    ok "c: the whole valid set once: $(grep -o "[0-9]* micro-batches.*ppl [0-9.]*" "$tmp/eval.txt"); and micro_batch 2"
else
    bad "c: a whole pass / micro_batch 2" "$(cat "$tmp/eval.txt" "$tmp/eval2.txt" 2>/dev/null | head -2)"
fi

# (d) errors
"$MOET" eval "$tmp/run" >/dev/null 2>"$tmp/err"
r1=$?
"$MOET" eval "$tmp/nothere" --data "$tmp/valid/*.npy" >/dev/null 2>"$tmp/err2"
r2=$?
if [[ $r1 -eq 2 && $r2 -eq 1 ]] && grep -q "missing --data" "$tmp/err" && grep -q "nothere" "$tmp/err2"; then
    ok "d: no --data: exit 2; a missing checkpoint: exit 1, $(head -c 70 "$tmp/err2" | sed "s|$tmp|TMP|")"
else
    bad "d: errors" "exit $r1 / $r2: $(cat "$tmp/err" "$tmp/err2" | head -2)"
fi
finish
