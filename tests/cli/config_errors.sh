#!/usr/bin/env bash
# config_errors: `moet info` refuses bad configurations before anything runs, with exit status
# 2 and a message on stderr that names the file (or the --set), the key and the reason; a good
# configuration exits 0.
# Usage, from the repository root (ctest does this): bash tests/cli/config_errors.sh PATH/TO/moet
set -u

MOET=${1:?usage: bash tests/cli/config_errors.sh PATH/TO/moet}
if [[ ! -x $MOET ]]; then
    echo "config_errors: $MOET is not an executable (build moet first)" >&2
    exit 1
fi
if [[ ! -f configs/tiny-moe.ini ]]; then
    echo "config_errors: run from the repository root (configs/tiny-moe.ini not found)" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moet-config-errors.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

# A small valid MoE config; each bad case below is this file with one edit.
cat >"$tmp/base.ini" <<'EOF'
# base for tests/cli/config_errors.sh
[model]
d_model = 64
n_layers = 2
n_heads = 4
vocab_size = 50280
max_seq_len = 128

[moe]
n_experts = 8
top_k = 2
expert_d_ff = 64

[train]
seq_len = 128
micro_batch = 4
global_batch = 8
max_steps = 10

[optim]
lr = 4e-4
EOF

# mk NAME SED-SCRIPT: writes $tmp/NAME.ini, the base edited by the sed script.
mk() {
    sed -e "$2" "$tmp/base.ini" >"$tmp/$1.ini"
    if cmp -s "$tmp/base.ini" "$tmp/$1.ini"; then
        echo "config_errors: the edit for $1 changed nothing (fix the test)" >&2
        exit 1
    fi
}

# expect NAME WANT_STATUS ARGS... -- SUBSTRING...: runs "$MOET" ARGS, checks the exit status
# and that stderr contains every SUBSTRING (literally).
expect() {
    local name=$1 want=$2
    shift 2
    local args=()
    while [[ $# -gt 0 && $1 != -- ]]; do
        args+=("$1")
        shift
    done
    [[ $# -gt 0 ]] && shift
    local rc=0
    timeout 60 "$MOET" "${args[@]}" >"$tmp/stdout" 2>"$tmp/stderr" || rc=$?
    local why=""
    if [[ $rc -ne $want ]]; then
        why="exit status $rc, want $want"
    else
        local s
        for s in "$@"; do
            if ! grep -qF -- "$s" "$tmp/stderr"; then
                why="stderr lacks: $s"
                break
            fi
        done
    fi
    if [[ -z $why ]]; then
        echo "ok   $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name: $why"
        echo "     command: $MOET ${args[*]}"
        sed 's/^/     stderr: /' "$tmp/stderr" | head -n 5
        failed=$((failed + 1))
    fi
}

mk unknown_key 's/^d_model = 64$/d_modle = 64/'
expect "unknown key" 2 info "$tmp/unknown_key.ini" -- \
    "moet: " "$tmp/unknown_key.ini:3:" "[model] d_modle" "unknown key" "d_model"

mk missing_key '/^seq_len = 128$/d'
expect "missing key" 2 info "$tmp/missing_key.ini" -- \
    "$tmp/missing_key.ini" "[train] seq_len" "missing (required)"

mk heads 's/^d_model = 64$/d_model = 100/; s/^n_heads = 4$/n_heads = 3/'
expect "d_model not divisible by n_heads" 2 info "$tmp/heads.ini" -- \
    "$tmp/heads.ini" "[model] d_model = 100 is not divisible by n_heads = 3"

mk topk 's/^top_k = 2$/top_k = 9/'
expect "top_k > n_experts" 2 info "$tmp/topk.ini" -- \
    "$tmp/topk.ini" "[moe] top_k = 9 must be <= n_experts = 8"

mk negative_lr 's/^lr = 4e-4$/lr = -1/'
expect "negative lr" 2 info "$tmp/negative_lr.ini" -- \
    "$tmp/negative_lr.ini:21:" "[optim] lr = -1" "must be >= 0"

mk not_a_number 's/^lr = 4e-4$/lr = abc/'
expect "lr not a number" 2 info "$tmp/not_a_number.ini" -- \
    "$tmp/not_a_number.ini:21:" "[optim] lr = abc" "not a number"

mk not_an_int 's/^max_steps = 10$/max_steps = 12x/'
expect "max_steps not an integer" 2 info "$tmp/not_an_int.ini" -- \
    "$tmp/not_an_int.ini:18:" "[train] max_steps = 12x" "not an integer"

expect "--set with a bad value" 2 info "$tmp/base.ini" --set optim.lr=abc -- \
    "--set optim.lr=abc" "[optim] lr = abc" "not a number"

expect "--set of an unknown key" 2 info "$tmp/base.ini" --set model.d_modle=64 -- \
    "--set model.d_modle=64" "[model] d_modle" "unknown key"

expect "malformed --set" 2 info "$tmp/base.ini" --set optim.lr -- \
    "--set optim.lr" "expected section.key=value"

expect "missing config file" 2 info "$tmp/no-such.ini" -- \
    "$tmp/no-such.ini" "No such file"

expect "sigmoid router without norm_topk_prob" 2 info "$tmp/base.ini" --set moe.router=sigmoid -- \
    "base.ini: [moe] router = sigmoid needs norm_topk_prob = true"
expect "unknown lb_scope" 2 info "$tmp/base.ini" --set moe.lb_scope=global -- \
    "[moe] lb_scope = global" "micro_batch|global_batch"
expect "negative bias_update_rate" 2 info "$tmp/base.ini" --set moe.bias_update_rate=-1 -- \
    "[moe] bias_update_rate = -1: must be >= 0"
expect "good config" 0 info "$tmp/base.ini" --
expect "good config with --set" 0 info "$tmp/base.ini" --set optim.lr=1e-3 --set parallel.ep=2 --
expect "shipped tiny-moe.ini" 0 info configs/tiny-moe.ini --
expect "balancing options" 0 info "$tmp/base.ini" --set moe.router=sigmoid \
    --set moe.norm_topk_prob=true --set moe.lb_scope=global_batch --set moe.bias_update_rate=1e-3 --

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
