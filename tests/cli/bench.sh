#!/usr/bin/env bash
# bench: `moet bench` on the CPU (the GPU runs are launch/gpu-check.sh's and gpu-perf.sh's).
#   (a) tiny-moe, 2 timed steps after 1 warm-up: exit 0, three step lines, the summary lines
#       (median step time, tokens/s, achieved, MFU against the measured sgemm peak, peak RSS);
#       no GPU lines (device memory, the host line) on the CPU;
#   (b) --vary-tokens: step 1 trains on the same first batch (the same loss, bit for bit, as
#       printed), steps 2 and 3 on new ones (losses that differ from (a)'s);
#   (c) usage errors exit 2 with the reason: an unknown option, --steps 0;
#   (d) --profile: the same losses as (a); the table of where a step goes, with the LM head's
#       matmuls [64 -> 50304] and their GFLOP/s (no GB/s), AdamW with its GB/s (no GFLOP/s),
#       the time between ops, and the step line, whose ms per step agree with the printed step
#       times (mean within 25 %).
# Usage, from the repository root (ctest does this): bash tests/cli/bench.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" bench "$@"
export OMP_NUM_THREADS=2

# bench NAME ARGS...: moet bench configs/tiny-moe.ini ARGS into $tmp/NAME.out; sets rc
bench() {
    local name=$1
    shift
    moet_np 1 120 "$name" bench configs/tiny-moe.ini "$@"
}
# loss NAME STEP: the loss printed on step STEP's line of NAME's output
loss() { sed -n "s/^step $2[^:]*: [0-9.]* s, loss \([0-9.]*\) .*/\1/p" "$tmp/$1.out"; }

# (a)
bench fixed --steps 2 --warmup 1
n_steps=$(grep -c '^step [0-9]' "$tmp/fixed.out")
if [[ $rc -eq 0 && $n_steps -eq 3 ]] && grep -q '^step 1 (warm-up): ' "$tmp/fixed.out" &&
    grep -q '^step time (median of 2): [0-9.]* s$' "$tmp/fixed.out" &&
    grep -q '^tokens/s: *[0-9.]*$' "$tmp/fixed.out" &&
    grep -q '^achieved: *[0-9.]* GFLOP/s$' "$tmp/fixed.out" &&
    grep -q '^MFU: *[0-9.]*% of the measured sgemm peak' "$tmp/fixed.out" &&
    grep -q '^peak memory (RSS): *[0-9.]* MiB$' "$tmp/fixed.out"; then
    ok "bench: step lines and the summary"
else
    cp "$tmp/fixed.out" "$tmp/err"
    bad "bench: step lines and the summary" "exit $rc, $n_steps step lines"
fi
if grep -q -e '^peak device memory' -e '^host, per timed step' "$tmp/fixed.out"; then
    bad "bench: no GPU lines on the CPU" "$(grep -e '^peak device' -e '^host,' "$tmp/fixed.out")"
else
    ok "bench: no GPU lines on the CPU"
fi

# (b)
bench vary --steps 2 --warmup 1 --vary-tokens
l1a=$(loss fixed 1) l1b=$(loss vary 1) l2a=$(loss fixed 2) l2b=$(loss vary 2)
l3a=$(loss fixed 3) l3b=$(loss vary 3)
if [[ $rc -eq 0 && -n $l1a && $l1a == "$l1b" ]]; then
    ok "bench --vary-tokens: the same first batch (loss $l1a)"
else
    bad "bench --vary-tokens: the same first batch" "exit $rc, step 1 loss $l1a vs $l1b"
fi
if [[ -n $l2b && -n $l3b && $l2a != "$l2b" && $l3a != "$l3b" ]]; then
    ok "bench --vary-tokens: new batches after it (step 2 loss $l2a vs $l2b, step 3 $l3a vs $l3b)"
else
    bad "bench --vary-tokens: new batches after it" "step 2 $l2a vs $l2b, step 3 $l3a vs $l3b"
fi

# (c)
bench bogus --bogus
if [[ $rc -eq 2 ]] && grep -q 'unknown option --bogus' "$tmp/err"; then
    ok "bench: an unknown option exits 2"
else
    bad "bench: an unknown option exits 2" "exit $rc"
fi
bench zero --steps 0
if [[ $rc -eq 2 ]] && grep -q -- '--steps must be >= 1' "$tmp/err"; then
    ok "bench: --steps 0 exits 2"
else
    bad "bench: --steps 0 exits 2" "exit $rc"
fi

# (d)
bench profile --steps 2 --warmup 1 --profile
if [[ $rc -eq 0 && $(loss profile 1) == "$l1a" && $(loss profile 3) == "$l3a" ]]; then
    ok "bench --profile: the same losses ($(loss profile 3) at step 3)"
else
    bad "bench --profile: the same losses" "exit $rc, step 3 loss $(loss profile 3) vs $l3a"
fi
f=$tmp/profile.out
# the mean of the timed steps' times (s) and the profile's step line (ms per step)
mean=$(sed -n 's/^step [23]: \([0-9.]*\) s,.*/\1/p' "$f" | awk '{ s += $1; n++ } END { if (n) print s / n }')
span=$(awk '/the step, first mark to last$/ { print $1 }' "$f")
if grep -q '^where a step goes (--profile: 2 steps, per step; host clock around each op):$' "$f" &&
    grep -Eq '^ +ms +share +calls +before +GFLOP/s +GB/s +op \[C -> OC\]$' "$f" &&
    grep -Eq '^ +[0-9.]+ +[0-9.]+% +1\.0 +[0-9.]+ +[0-9.]+ {11}matmul_forward \[64 -> 50304\]$' "$f" &&
    grep -Eq '^ +[0-9.]+ +[0-9.]+% +1\.0 +[0-9.]+ +[0-9.]+ {11}matmul_backward \[64 -> 50304\]$' "$f" &&
    grep -Eq '^ +[0-9.]+ +[0-9.]+% +[0-9.]+ +[0-9.]+ {11,}[0-9.]+  adamw_update$' "$f" &&
    grep -Eq '^ +[0-9.]+ +[0-9.]+% +\(between ops: host code outside the ops\)$' "$f" &&
    grep -Eq '^ +[0-9.]+ +100\.0% +the step, first mark to last$' "$f" &&
    awk -v m="$mean" -v s="$span" 'BEGIN { exit !(m > 0 && s > 0 && s / (1e3 * m) > 0.75 && s / (1e3 * m) < 1.25) }'; then
    ok "bench --profile: the table ($span ms per step against steps of $mean s)"
else
    cp "$f" "$tmp/err"
    bad "bench --profile: the table" "exit $rc; $span ms per step against steps of $mean s"
fi
finish
