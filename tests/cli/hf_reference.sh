#!/usr/bin/env bash
# hf_reference: tests/reference/check_hf_export.py on a freshly trained tiny-moe checkpoint: the
# exported model loads in HF transformers, its logits and loss equal moet's on the same tokens,
# and moet's greedy generation equals transformers'. Needs python3 with torch and transformers
# (pip): without them it exits 77, which ctest reports as skipped (CI installs no torch).
# Usage, from the repository root (ctest does this): bash tests/cli/hf_reference.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" hf_reference "$@"
if ! python3 -c "import numpy, torch, transformers" 2>/dev/null; then
    echo "hf_reference: skipped: python3 with numpy, torch and transformers not found" \
        "(pip install torch transformers to run it)"
    exit 77
fi
tokenize_sample
# 60 steps: a model whose greedy choices are no longer near ties, as a random one's may be
"$MOET" train --config configs/tiny-moe.ini --set "data.train=$tmp/train/*.npy" \
    --set "data.valid=$tmp/valid/*.npy" --set train.max_steps=60 --set train.eval_every=0 \
    --set checkpoint.every=60 --set "checkpoint.dir=$tmp/run" >"$tmp/train.out" 2>"$tmp/err" ||
    { bad "train tiny-moe 60 steps" "exit $?"; finish; exit 1; }
if python3 tests/reference/check_hf_export.py "$MOET" "$tmp/run" "$TOK" >"$tmp/check.out" 2>"$tmp/err"; then
    sed 's/^/     | /' "$tmp/check.out"
    ok "check_hf_export.py: export loads in transformers; logits, loss and greedy generation equal"
else
    sed 's/^/     | /' "$tmp/check.out"
    bad "check_hf_export.py" "exit status $?"
fi
finish
