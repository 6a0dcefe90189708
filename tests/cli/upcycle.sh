#!/usr/bin/env bash
# upcycle: `moet upcycle --dense CKPT --config MOE.ini --out DIR`: (a) a dense tiny model trained
# 5 steps, upcycled into tiny-moe with norm_topk_prob = true as 8 copies (G = 1) and as 4 copies
# x 2 slices (G = 2), writes a model-only step-0 checkpoint that verifies; (b) `moet eval` of the
# dense and the upcycled checkpoints on the valid shards gives the same loss (within 1e-5);
# (c) `moet train --init` trains from it and the loss falls; (d) norm_topk_prob = false warns;
# (e) errors: another d_model exits 2 naming the tensor, an MoE checkpoint as --dense exits 2,
# an --out that holds checkpoints exits 2.
# Usage, from the repository root (ctest does this): bash tests/cli/upcycle.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" upcycle "$@"
tokenize_sample

# small batches keep it quick: one micro-batch of 4 x 64 tokens per step
data=(--set "data.train=$tmp/train/*.npy" --set "data.valid=$tmp/valid/*.npy")
small=(--set train.seq_len=64 --set train.global_batch=4 --set train.eval_every=0)
moe=(--set moe.norm_topk_prob=true)

"$MOET" train --config configs/tiny-dense.ini "${data[@]}" "${small[@]}" \
    --set train.max_steps=5 --set "checkpoint.dir=$tmp/dense" >"$tmp/train.out" 2>"$tmp/err" ||
    { bad "train tiny-dense 5 steps" "exit $?"; finish; exit 1; }

# (a)
upcycled() {  # G: the checkpoint's files, a model-only step 0 whose checksums verify
    [[ -f $tmp/up$1/step00000000.h5 && -L $tmp/up$1/latest.h5 ]] &&
        "$MOET" inspect "$tmp/up$1" --verify >"$tmp/inspect.out" 2>>"$tmp/err" &&
        grep -Eq "^  step +0$" "$tmp/inspect.out" &&
        grep -Eq "^  model_only +1$" "$tmp/inspect.out" &&
        grep -q "^verified .*: OK" "$tmp/inspect.out" &&
        grep -q "^train from it: moet train" "$tmp/up$1.out"
}
for g in 1 2; do
    if "$MOET" upcycle --dense "$tmp/dense" --config configs/tiny-moe.ini "${moe[@]}" \
        --set moe.expert_d_ff=$((256 / g)) --granularity $g --out "$tmp/up$g" \
        >"$tmp/up$g.out" 2>"$tmp/err" && upcycled $g; then
        ok "a: G = $g (expert_d_ff $((256 / g))): a model-only step-0 checkpoint that verifies"
    else
        bad "a: upcycle G = $g" "$(head -n 3 "$tmp/up$g.out" 2>/dev/null)"
    fi
done

# (b) the same loss: the upcycled models compute the dense one's function (float rounding apart)
evalloss() {
    "$MOET" eval "$1" --data "$tmp/valid/*.npy" --batches 4 --set train.micro_batch=4 \
        --set train.seq_len=64 --json 2>"$tmp/err" | grep -o '"loss":[^,]*' | sed 's/.*://'
}
ld=$(evalloss "$tmp/dense")
for g in 1 2; do
    lu=$(evalloss "$tmp/up$g")
    if [[ -n $ld && -n $lu ]] &&
        awk -v a="$ld" -v b="$lu" 'BEGIN { d = a - b; exit !(d < 1e-5 && d > -1e-5) }'; then
        ok "b: G = $g: eval loss dense $ld, upcycled $lu (|diff| < 1e-5)"
    else
        bad "b: eval G = $g" "dense '$ld', upcycled '$lu'"
    fi
done

# (c) training from the G = 2 checkpoint: the loss falls over 20 steps
if "$MOET" train --config configs/tiny-moe.ini "${data[@]}" "${small[@]}" "${moe[@]}" \
    --set moe.expert_d_ff=128 --set train.max_steps=20 --set "checkpoint.dir=$tmp/moe" \
    --init "$tmp/up2" >"$tmp/moe.out" 2>"$tmp/err" &&
    grep -q "^initialised from the weights of" "$tmp/moe.out"; then
    vals=$(losses moe | sed 's/.*"loss"://')
    mean5='{ s += $1 } END { if (NR == 5) printf "%.4f", s / 5 }'
    first=$(echo "$vals" | head -n 5 | awk "$mean5")
    last=$(echo "$vals" | tail -n 5 | awk "$mean5")
    if [[ $(echo "$vals" | wc -l) -eq 20 && -n $first && -n $last ]] &&
        awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }'; then
        ok "c: train --init from G = 2, 20 steps: mean loss of steps 1-5 $first > 16-20 $last"
    else
        bad "c: the loss does not fall" "first 5 '$first', last 5 '$last'"
    fi
else
    bad "c: train --init from the upcycled checkpoint" "exit status $?"
fi

# (d) norm_topk_prob = false: allowed, with a warning
if "$MOET" upcycle --dense "$tmp/dense" --config configs/tiny-moe.ini --set moe.expert_d_ff=256 \
    --out "$tmp/upf" >/dev/null 2>"$tmp/err" &&
    grep -q "warning: \[moe\] norm_topk_prob = false" "$tmp/err"; then
    ok "d: norm_topk_prob = false: $(grep -o 'warning: [^:]*' "$tmp/err" | head -c 80)"
else
    bad "d: norm_topk_prob = false" "no warning or a failure"
fi

# (e) errors
"$MOET" upcycle --dense "$tmp/dense" --config configs/tiny-moe.ini "${moe[@]}" \
    --set moe.expert_d_ff=256 --set model.d_model=128 --out "$tmp/bad1" >/dev/null 2>"$tmp/err1"
r1=$?
"$MOET" upcycle --dense "$tmp/moe" --config configs/tiny-moe.ini "${moe[@]}" \
    --set moe.expert_d_ff=256 --out "$tmp/bad2" >/dev/null 2>"$tmp/err2"
r2=$?
"$MOET" upcycle --dense "$tmp/dense" --config configs/tiny-moe.ini "${moe[@]}" \
    --set moe.expert_d_ff=256 --out "$tmp/dense" >/dev/null 2>"$tmp/err3"
r3=$?
want='model.embed_tokens.weight is \[50304, 64\] in .* wants \[50304, 128\]'
if [[ $r1 -eq 2 && ! -e $tmp/bad1 ]] && grep -q "$want" "$tmp/err1"; then
    ok "e: d_model 128: exit 2, $(head -c 90 "$tmp/err1" | sed "s|$tmp|TMP|")..."
else
    bad "e: d_model mismatch" "exit $r1: $(head -c 300 "$tmp/err1")"
fi
if [[ $r2 -eq 2 ]] && grep -q "is an MoE model" "$tmp/err2"; then
    ok "e: an MoE checkpoint as --dense: exit 2, $(head -c 90 "$tmp/err2" | sed "s|$tmp|TMP|")..."
else
    bad "e: MoE as --dense" "exit $r2: $(head -c 300 "$tmp/err2")"
fi
if [[ $r3 -eq 2 && -f $tmp/dense/step00000005.h5 ]] &&
    grep -q "already holds checkpoints" "$tmp/err3"; then
    ok "e: --out a run folder: exit 2, its checkpoints untouched"
else
    bad "e: --out holding checkpoints" "exit $r3: $(head -c 300 "$tmp/err3")"
fi
finish
