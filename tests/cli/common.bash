# common.bash: what the CLI tests share (sourced; ctest runs tests/cli/*.sh only).
#   source "$(dirname "$0")/common.bash" NAME "$@"
# checks that $1 is the moet executable and that the script runs from the repository root, and
# sets:
#   MOET, TOK   the executable and the OLMo tokenizer file
#   tmp         a temporary folder, removed at exit (with the process $bgpid, when set)
#   ok NAME / bad NAME WHY   count a passed / failed check (bad shows the end of $tmp/err)
#   tokenize_sample          the bundled sample's train and valid documents into
#                            $tmp/train and $tmp/valid (exits 1 when that fails)
#   losses RUN               the "loss" fields of $tmp/RUN/metrics.jsonl, as written (%.17g)
#   same NAME A B [LINES]    ok NAME when run B logged exactly run A's losses (the last LINES
#                            of A's when given), else bad NAME with the first differences
#   moet_np NP TIMEOUT OUT ARGS...
#                            moet ARGS on NP ranks (1: no mpirun; more: mpirun --oversubscribe
#                            over TCP, passing OMP_NUM_THREADS and MOET_DEBUG_STALL if set), stopped
#                            after TIMEOUT s; stdout to $tmp/OUT.out, stderr to $tmp/err; sets rc
#   finish                   prints the counts; its status is the script's
set -u
CLI_NAME=$1
MOET=${2:-}
if [[ -z $MOET || ! -x $MOET ]]; then
    echo "$CLI_NAME: '$MOET' is not an executable (usage: bash tests/cli/$CLI_NAME.sh" \
        "PATH/TO/moet, after building moet)" >&2
    exit 1
fi
TOK=data/tokenizers/gpt-neox-olmo-dolma-v1_5.json
if [[ ! -f $TOK || ! -f configs/tiny-moe.ini ]]; then
    echo "$CLI_NAME: run from the repository root ($TOK or configs/tiny-moe.ini not found)" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moet-$CLI_NAME.XXXXXX")
bgpid=
cli_cleanup_() {
    [[ -n $bgpid ]] && kill "$bgpid" 2>/dev/null
    rm -rf "$tmp"
}
trap cli_cleanup_ EXIT
passed=0
failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() {
    echo "FAIL $1: $2"
    [[ -f $tmp/err ]] && sed 's/^/     | /' "$tmp/err" | tail -n 8
    failed=$((failed + 1))
}

tokenize_sample() {
    local split
    for split in train valid; do
        "$MOET" tokenize --quiet --tokenizer "$TOK" --out "$tmp/$split" \
            "data/sample/documents/$split.jsonl.gz" >/dev/null 2>"$tmp/err" || {
            echo "$CLI_NAME: tokenizing the $split sample failed:" >&2
            cat "$tmp/err" >&2
            exit 1
        }
    done
}

losses() { grep -o '"step":[0-9]*,"tokens":[0-9]*,"loss":[^,]*' "$tmp/$1/metrics.jsonl"; }

same() {
    local want
    if [[ -n ${4:-} ]]; then want=$(losses "$2" | tail -n "$4"); else want=$(losses "$2"); fi
    if [[ $(losses "$3" | wc -l) -eq 0 ]]; then
        bad "$1" "no losses logged by $3"
    elif [[ $want != "$(losses "$3")" ]]; then
        bad "$1" "$(diff <(echo "$want") <(losses "$3") | head -4)"
    else
        ok "$1"
    fi
}

moet_np() {
    local np=$1 to=$2 out=$3
    shift 3
    local cmd=("$MOET")
    if [[ $np -gt 1 ]]; then
        cmd=(mpirun -np "$np" --oversubscribe --mca btl tcp,self -x OMP_NUM_THREADS)
        [[ -n ${MOET_DEBUG_STALL+set} ]] && cmd+=(-x MOET_DEBUG_STALL)
        cmd+=("$MOET")
    fi
    rc=0
    timeout "$to" "${cmd[@]}" "$@" >"$tmp/$out.out" 2>"$tmp/err" || rc=$?
}

finish() {
    echo "$CLI_NAME: $passed passed, $failed failed"
    [[ $failed -eq 0 ]]
}
