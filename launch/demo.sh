#!/usr/bin/env bash
# The demo: installs what is missing, builds moet, tokenizes the bundled sample
# (data/sample/tokens/), then trains the tiny MoE model (configs/tiny-moe.ini) for a 300-step
# schedule: the run stops after step 200 with a checkpoint, as a pre-empted job would, and
# `--resume latest` finishes it. It prints the validation loss before training (step 0) and
# after, plots the curves and the expert loads (checkpoints/demo-tiny-moe/loss.png,
# expert_load.png), and ends with a short text sampled from the trained model (`moet generate`).
# About 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
RUN=checkpoints/demo-tiny-moe
MOET=$BUILD_DIR/moet
TOK=data/tokenizers/gpt-neox-olmo-dolma-v1_5.json
t0=$SECONDS

bash launch/setup-deps.sh
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" >/dev/null

for split in train valid; do
    if ! ls data/sample/tokens/$split/*.npy >/dev/null 2>&1; then
        echo "== $MOET tokenize ... --out data/sample/tokens/$split"
        "$MOET" tokenize --tokenizer "$TOK" --out data/sample/tokens/$split \
            data/sample/documents/$split.jsonl.gz
    fi
done

# 300 steps of 8 x 128 tokens; checkpoints every 100 steps; evaluation every 50
SETS=(--set train.max_steps=300 --set checkpoint.every=100 --set train.eval_every=50
      --set checkpoint.dir=$RUN --set train.log_every=10)
rm -rf "$RUN"  # the demo's own output from an earlier demo
echo
echo "== $MOET train --config configs/tiny-moe.ini ${SETS[*]} --stop-at 200"
"$MOET" train --config configs/tiny-moe.ini "${SETS[@]}" --stop-at 200
echo
echo "== $MOET train --config configs/tiny-moe.ini ${SETS[*]} --resume latest"
"$MOET" train --config configs/tiny-moe.ini "${SETS[@]}" --resume latest

echo
first=$(grep -m1 '"val_loss"' "$RUN/metrics.jsonl")
last=$(grep '"val_loss"' "$RUN/metrics.jsonl" | tail -n 1)
val() {
    awk '{ match($0, /"step":[0-9]+/); s = substr($0, RSTART + 7, RLENGTH - 7)
           match($0, /"val_loss":[^,}]+/); printf "%.4f (step %d)", substr($0, RSTART + 11, RLENGTH - 11), s }' <<<"$1"
}
echo "validation loss before training: $(val "$first")"
echo "validation loss after training:  $(val "$last")"
ls "$RUN"
if command -v gnuplot >/dev/null; then bash launch/plot-metrics.sh "$RUN"; fi
echo
echo "== $MOET generate $RUN --prompt \"The Debian package\" --max-new-tokens 40 --seed 1"
"$MOET" generate "$RUN" --prompt "The Debian package" --max-new-tokens 40 --seed 1
echo "demo: $((SECONDS - t0)) s"
