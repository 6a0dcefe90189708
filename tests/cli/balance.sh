#!/usr/bin/env bash
# balance: the load-balancing options of issue 11 through `moet train` and mpirun.
# (a) lb_scope = global_batch: world 2 x accumulation 1 (each MoE layer sums its counts over the
#     ranks) logs the bit-identical loss, lb and gradient norm of world 1 x accumulation 2 (a
#     routing pre-pass), and its checkpoint holds bit-identical weights; so do 4 ranks and 1 rank
#     for a global batch of 4 micro-batches (2 ranks x 2: the same lb to rounding), and recompute
#     = full. lb_scope = micro_batch deliberately differs: its lb is not the global one at any
#     step.
# (b) ep 2 with the global lb and the expert bias routes exactly as ep 1 (the same loads, so the
#     same biases) and logs its losses within 1e-6.
# (c) the expert bias (sigmoid router): a run stopped at step 3 and resumed, on 1 or 2 ranks,
#     continues bit-identically: losses, and the weights and biases of the last checkpoint.
# (d) telemetry: per-layer load figures in metrics.jsonl, expert_load.tsv (one line per step and
#     layer, each the step's tokens x top_k; trimmed on resume), the heat map of plot-metrics.sh.
# (e) export-hf refuses a sigmoid router and a non-zero bias (exit 2), and exports a
#     global-batch softmax run.
# Usage, from the repository root (ctest does this): bash tests/cli/balance.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" balance "$@"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
tokenize_sample

# run NP RUN ARGS...: moet train on tiny-moe (micro-batches of 4 sequences) with NP ranks
# (1: no mpirun), output in $tmp/RUN; sets rc.
run() {
    local np=$1 name=$2
    shift 2
    moet_np "$np" 300 "$name" train --config configs/tiny-moe.ini \
        --set "data.train=$tmp/train/*.npy" --set "data.valid=$tmp/valid/*.npy" \
        --set train.eval_every=0 --set "checkpoint.dir=$tmp/$name" "$@"
}
# fields RUN: step, loss, ce, lb, z and grad_norm of every logged step, as written (%.17g)
fields() {
    grep -o '"step":[0-9]*,"tokens":[0-9]*,"loss":[^,]*,"ce":[^,]*,"lb":[^,]*,"z":[^,]*,"lr":[^,]*,"grad_norm":[^,]*' \
        "$tmp/$1/metrics.jsonl"
}
# lbs RUN: the lb field of every logged step
lbs() { grep -o '"lb":[^,]*' "$tmp/$1/metrics.jsonl"; }
# tensors CKPT: the /model datasets' names, shapes and checksums
tensors() { "$MOET" inspect "$1" | grep '^  model/'; }
# identical NAME A B: ok when runs A and B logged the same fields and their last checkpoints hold
# the same /model tensors (names, shapes, CRCs), else bad
identical() {
    local fa fb
    fa=$(fields "$2") fb=$(fields "$3")
    if [[ -z $fa || $fa != "$fb" ]]; then
        bad "$1" "$(diff <(echo "$fa") <(echo "$fb") | head -4)"
    elif [[ $(tensors "$tmp/$2") != "$(tensors "$tmp/$3")" ]]; then
        bad "$1" "the checkpoints' tensors differ: $(diff <(tensors "$tmp/$2") <(tensors "$tmp/$3") | head -3)"
    else
        ok "$1"
    fi
}

GB=(--set moe.lb_scope=global_batch --set train.max_steps=4 --set checkpoint.every=4)

# (a) world 2 x accum 1 == world 1 x accum 2 with the global-batch lb
run 1 g1 "${GB[@]}"
r1=$rc
run 2 g2 "${GB[@]}"
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "a: global-batch lb on 1 and 2 ranks" "exit $r1 / $rc"
else
    identical "a: global_batch: world 2 x accum 1 = world 1 x accum 2 (loss, lb, grad norm, weights)" g1 g2
    grep -q 'routing pre-pass' "$tmp/g1.out" && grep -q 'summed over the ranks' "$tmp/g2.out" &&
        ok "a: accumulation 2 took the pre-pass, 2 ranks the in-layer count sum" ||
        bad "a: the two routes to the global counts" "not announced in the logs"
fi
# micro_batch scope (OLMoE) differs: each micro-batch's own f
run 1 m1 --set train.max_steps=4 --set checkpoint.every=4
differ=$(paste -d' ' <(lbs g1) <(lbs m1) | awk '$1 != $2' | wc -l)
if [[ $rc -ne 0 ]]; then
    bad "a: micro_batch run" "exit $rc"
elif [[ $(lbs m1 | wc -l) -eq 4 && $differ -eq 4 ]]; then
    ok "a: micro_batch scope logs another lb at each of the 4 steps ($(lbs m1 | head -1) vs $(lbs g1 | head -1))"
else
    bad "a: micro_batch vs global_batch lb" "only $differ of 4 steps differ"
fi
# a global batch of 4 micro-batches: 4 ranks x 1 = 1 rank x 4, bit for bit; 2 ranks x 2 (the
# pre-pass, then the counts summed over the ranks) takes the same global counts (step 1: the
# same lb, bit for bit; the same loads at every step), but sums its 4 gradients in another
# order, (g0 + g2) + (g1 + g3), so later steps agree to rounding only (as with the OLMoE loss)
G16=("${GB[@]}" --set train.global_batch=16)
run 1 h1 "${G16[@]}"
run 4 h4 "${G16[@]}"
if [[ $rc -ne 0 ]]; then
    bad "a: global batch 16 on 4 ranks" "exit $rc"
else
    identical "a: global_batch, 4 micro-batches: 4 ranks x accum 1 = 1 rank x accum 4" h1 h4
fi
run 2 h2 "${G16[@]}"
if [[ $rc -ne 0 ]]; then
    bad "a: global batch 16 on 2 ranks" "exit $rc"
elif [[ $(lbs h1 | head -1) != "$(lbs h2 | head -1)" ]] ||
     ! cmp -s "$tmp/h1/expert_load.tsv" "$tmp/h2/expert_load.tsv" ||
     ! paste -d' ' <(lbs h1 | sed 's/.*://') <(lbs h2 | sed 's/.*://') |
        awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > 1e-9 * $1) exit 1 }'; then
    bad "a: global_batch, 2 ranks x accum 2 vs 1 rank x accum 4" "$(paste <(lbs h1) <(lbs h2) | head -4)"
else
    ok "a: global_batch, 2 ranks x accum 2: the lb of 1 rank x accum 4 (step 1 bit for bit, then within 1e-9), the same loads"
fi
# recompute = full reruns each layer's forward (and its count all-reduce) in backward
run 1 g1r "${GB[@]}" --set train.recompute=full
identical "a: global_batch with recompute = full, 1 rank (pre-pass)" g1 g1r
run 2 g2r "${GB[@]}" --set train.recompute=full
identical "a: global_batch with recompute = full, 2 ranks (count sums rerun)" g2 g2r

# (b) ep 2 + global lb + expert bias vs ep 1, 2 ranks
BB=("${GB[@]}" --set moe.bias_update_rate=0.01)
run 2 b1 "${BB[@]}"
r1=$rc
run 2 b2 "${BB[@]}" --set parallel.ep=2 --set parallel.zero=1
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "b: ep 1 / ep 2 with the bias" "exit $r1 / $rc"
elif ! cmp -s "$tmp/b1/expert_load.tsv" "$tmp/b2/expert_load.tsv"; then
    bad "b: ep 2 vs ep 1" "the expert loads differ"
elif [[ $(tensors "$tmp/b1" | grep expert_bias) != "$(tensors "$tmp/b2" | grep expert_bias)" ]]; then
    bad "b: ep 2 vs ep 1" "the expert biases differ"
elif ! awk -F'[:,]' 'NR == FNR { a[$2] = $6; next }
                    { d = a[$2] - $6; if (d < 0) d = -d; if (d > 1e-6 * $6) exit 1 }' \
        <(fields b1) <(fields b2); then
    bad "b: ep 2 vs ep 1" "losses differ by more than 1e-6"
else
    ok "b: ep 2 (ZeRO-1) with the global lb and the bias: the loads and biases of ep 1, losses within 1e-6"
fi

# (c) resume with the expert bias: uninterrupted vs stopped at 3 and resumed (1 and 2 ranks)
CB=(--set moe.router=sigmoid --set moe.norm_topk_prob=true --set moe.bias_update_rate=0.01
    --set moe.lb_scope=global_batch --set train.max_steps=6 --set checkpoint.every=3)
run 1 c0 "${CB[@]}"
if [[ $rc -ne 0 ]]; then
    bad "c: the uninterrupted run" "exit $rc"
else
    run 1 c1 "${CB[@]}" --stop-at 3
    run 1 c1 "${CB[@]}" --resume latest
    identical "c: expert bias: stop at 3 + resume = uninterrupted (losses, weights, biases)" c0 c1
    mkdir -p "$tmp/c2" && cp "$tmp/c0/step00000003.h5" "$tmp/c2/" &&
        ln -s step00000003.h5 "$tmp/c2/latest.h5"
    run 2 c2 "${CB[@]}" --resume latest
    if [[ $rc -ne 0 ]]; then
        bad "c: resume on 2 ranks" "exit $rc"
    elif [[ $(fields c0 | tail -n 3) != "$(fields c2)" ||
            $(tensors "$tmp/c0") != "$(tensors "$tmp/c2")" ]]; then
        bad "c: resume on 2 ranks" "$(diff <(fields c0 | tail -n 3) <(fields c2) | head -4)"
    else
        ok "c: expert bias: a 1-rank checkpoint resumed on 2 ranks continues bit-identically"
    fi
    n=$(tensors "$tmp/c0" | grep -c 'mlp.gate.expert_bias  *(8) ')
    [[ $n -eq 2 ]] && ok "c: the checkpoint holds model.layers.{0,1}.mlp.gate.expert_bias (8)" ||
        bad "c: expert_bias datasets" "$n of 2"
    "$MOET" inspect "$tmp/c0" | grep -q 'optim/exp_avg/model.layers.0.mlp.gate.expert_bias' &&
        bad "c: /optim" "holds moments of the bias" || ok "c: no optimizer moments for the bias"
fi

# (d) telemetry
L=$(tail -n 1 "$tmp/c0/metrics.jsonl")
if [[ $L =~ \"layer_load_max_mean\":\[[0-9.e+-]+,[0-9.e+-]+\] &&
      $L =~ \"layer_top_frac\":\[[0-9.e+-]+,[0-9.e+-]+\] ]]; then
    ok "d: metrics.jsonl: layer_load_max_mean and layer_top_frac for both layers"
else
    bad "d: metrics.jsonl" "no per-layer load figures: $L"
fi
sums=$(grep -v '^#' "$tmp/c1/expert_load.tsv" | awk '{ s = 0; for (i = 3; i <= NF; i++) s += $i; print NF, s }' | sort -u)
steps=$(grep -v '^#' "$tmp/c1/expert_load.tsv" | cut -f1,2 | sort -u | wc -l)
if [[ $sums == "10 2048" && $steps -eq 12 && $(grep -c '^#' "$tmp/c1/expert_load.tsv") -eq 1 ]] &&
   cmp -s "$tmp/c0/expert_load.tsv" "$tmp/c1/expert_load.tsv"; then
    ok "d: expert_load.tsv: 6 steps x 2 layers of 8 loads summing to 8 x 128 x 2, the same after a resume"
else
    bad "d: expert_load.tsv" "fields/sums '$sums', $steps (step, layer) pairs"
fi
if command -v gnuplot >/dev/null; then
    if bash launch/plot-metrics.sh "$tmp/c0" --layer 1 >"$tmp/plot.out" 2>"$tmp/err" &&
       [[ -s $tmp/c0/expert_load.png && -s $tmp/c0/loss.png ]]; then
        ok "d: plot-metrics.sh draws expert_load.png (layer 1) beside loss.png"
    else
        bad "d: plot-metrics.sh" "no expert_load.png"
    fi
    bash launch/plot-metrics.sh "$tmp/c0" --layer 2 >/dev/null 2>"$tmp/err" &&
        bad "d: plot-metrics.sh --layer 2" "accepted a layer the run does not have" ||
        ok "d: plot-metrics.sh refuses --layer 2 of a 2-layer run"
else
    echo "skip d: plot-metrics.sh (no gnuplot)"
fi

# (e) export-hf
"$MOET" export-hf "$tmp/c0" "$tmp/hf-c0" >/dev/null 2>"$tmp/err"
rc=$?
if [[ $rc -eq 2 ]] && grep -q 'router = sigmoid' "$tmp/err" && grep -q 'HINT' "$tmp/err"; then
    ok "e: export-hf refuses the sigmoid router (exit 2, with what to do)"
else
    bad "e: export-hf of a sigmoid run" "exit $rc"
fi
"$MOET" export-hf "$tmp/b1" "$tmp/hf-b1" >/dev/null 2>"$tmp/err"
rc=$?
if [[ $rc -eq 2 ]] && grep -q 'expert_bias is not zero' "$tmp/err"; then
    ok "e: export-hf refuses a non-zero expert bias (exit 2)"
else
    bad "e: export-hf of a biased run" "exit $rc"
fi
if "$MOET" export-hf "$tmp/g1" "$tmp/hf-g1" >/dev/null 2>"$tmp/err"; then
    ok "e: export-hf of a global-batch softmax run"
else
    bad "e: export-hf of a global-batch run" "exit $?"
fi

finish
