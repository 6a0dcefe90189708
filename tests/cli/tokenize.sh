#!/usr/bin/env bash
# tokenize: `moet tokenize` end to end on small documents made here, checked against known ids
# (the OLMo tokenizer's golden vector, independent of moet) with od and zcat: plain, .gz (also
# multi-member), .zst (also multi-frame); csv rows; whitespace stripping and empty documents;
# bad lines with and without --skip-bad; part rolling; ranks; --threads 1/2/3 give identical
# bytes on the bundled sample; exit codes; no .tmp files left.
# Usage, from the repository root (ctest does this): bash tests/cli/tokenize.sh PATH/TO/moet
set -u

MOET=${1:?usage: bash tests/cli/tokenize.sh PATH/TO/moet}
if [[ ! -x $MOET ]]; then
    echo "tokenize: $MOET is not an executable (build moet first)" >&2
    exit 1
fi
TOK=
for t in data/tokenizers/gpt-neox-olmo-dolma-v1_5.json \
    tests/fixtures/tokenizer/gpt-neox-olmo-dolma-v1_5.json; do
    [[ -f $t ]] && TOK=$t && break
done
if [[ -z $TOK ]]; then
    echo "tokenize: gpt-neox-olmo-dolma-v1_5.json not found under data/tokenizers or" \
        "tests/fixtures/tokenizer (run from the repository root)" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moet-tokenize.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() {
    echo "FAIL $1: $2"
    [[ -f $tmp/err ]] && sed 's/^/     | /' "$tmp/err" | head -n 8
    failed=$((failed + 1))
}

# tok OUTDIR ARGS...: runs moet tokenize into OUTDIR (stderr -> $tmp/err); sets rc.
tok() {
    local out=$1
    shift
    "$MOET" tokenize --tokenizer "$TOK" --out "$out" --quiet "$@" 2>"$tmp/err"
    rc=$?
}
ids() { od -An -v -tu2 "$1" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//'; }
no_tmp() { [[ -z $(find "$tmp" -name '*.tmp' -print -quit) ]]; }

# "This is a document with no newlines." -> these ids (HF tokenizers, gpt-neox-olmo-dolma-v1_5)
GOLD="1552 310 247 3389 342 642 747 8737 15"
EOS=50279
DOC='{"id": "d1", "text": "This is a document with no newlines.", "source": "test"}'

# ---- usage and exit codes
"$MOET" tokenize --help >"$tmp/help" 2>&1 && grep -q -- '--max-tokens-per-file' "$tmp/help" &&
    ok "--help exits 0 and documents the options" || bad "--help" "exit $? or options missing"

echo "$DOC" >"$tmp/one.jsonl"
for case in "no arguments|" "unknown option|--frobnicate $tmp/one.jsonl" \
    "missing --out|--tokenizer $TOK $tmp/one.jsonl" "missing --tokenizer|--out $tmp/u $tmp/one.jsonl" \
    "missing INPUT|--tokenizer $TOK --out $tmp/u" "bad --threads|--tokenizer $TOK --out $tmp/u --threads 0 $tmp/one.jsonl"; do
    name=${case%%|*}
    # shellcheck disable=SC2086
    "$MOET" tokenize ${case#*|} 2>"$tmp/err" >/dev/null
    rc=$?
    [[ $rc == 2 ]] && ok "usage error: $name -> exit 2" || bad "usage error: $name" "exit $rc, want 2"
done
tok "$tmp/u" "$tmp/one.jsonl" "$tmp/no-such-file.jsonl"
[[ $rc == 2 ]] && grep -q 'no-such-file.jsonl' "$tmp/err" && [[ ! -e $tmp/u ]] &&
    ok "unreadable input: exit 2, named, nothing written" || bad "unreadable input" "exit $rc"

# ---- the golden vector in every container format
# plain: one document -> its ids + EOS, row 0,10,d1,PATH,1
tok "$tmp/plain" "$tmp/one.jsonl"
got=$(ids "$tmp/plain/part-0-00000.npy" 2>/dev/null)
[[ $rc == 0 && $got == "$GOLD $EOS" ]] && ok "plain: golden ids + EOS (uint16)" ||
    bad "plain: golden ids" "exit $rc, got '$got'"
row=$(zcat "$tmp/plain/part-0-00000.csv.gz" 2>/dev/null)
[[ $row == "0,10,d1,$tmp/one.jsonl,1" ]] && ok "plain: csv row start,end,id,src,loc" ||
    bad "plain: csv row" "got '$row'"

# .gz, multi-member: member 1 holds lines 1-2, member 2 line 3
{ echo "$DOC"; echo "$DOC"; } | gzip -c >"$tmp/multi.jsonl.gz"
echo "$DOC" | gzip -c >>"$tmp/multi.jsonl.gz"
tok "$tmp/gz" "$tmp/multi.jsonl.gz"
got=$(ids "$tmp/gz/part-0-00000.npy" 2>/dev/null)
rows=$(zcat "$tmp/gz/part-0-00000.csv.gz" 2>/dev/null | tr '\n' ' ')
want_rows="0,10,d1,$tmp/multi.jsonl.gz,1 10,20,d1,$tmp/multi.jsonl.gz,2 20,30,d1,$tmp/multi.jsonl.gz,3 "
[[ $rc == 0 && $got == "$GOLD $EOS $GOLD $EOS $GOLD $EOS" && $rows == "$want_rows" ]] &&
    ok "multi-member .gz: 3 documents, rows and ids" || bad "multi-member .gz" "exit $rc, rows '$rows'"

if command -v zstd >/dev/null; then
    { echo "$DOC"; echo "$DOC"; } | zstd -q -c >"$tmp/multi.jsonl.zst"
    echo "$DOC" | zstd -q -c >>"$tmp/multi.jsonl.zst"
    tok "$tmp/zst" "$tmp/multi.jsonl.zst"
    got=$(ids "$tmp/zst/part-0-00000.npy" 2>/dev/null)
    [[ $rc == 0 && $got == "$GOLD $EOS $GOLD $EOS $GOLD $EOS" ]] &&
        ok "multi-frame .zst: 3 documents" || bad "multi-frame .zst" "exit $rc, got '$got'"
else
    echo "skip multi-frame .zst: no zstd command"
fi

head -c 40 "$tmp/multi.jsonl.gz" >"$tmp/trunc.jsonl.gz"
tok "$tmp/trunc" "$tmp/trunc.jsonl.gz"
[[ $rc == 1 ]] && grep -q 'trunc.jsonl.gz' "$tmp/err" && [[ -z $(ls -A "$tmp/trunc" 2>/dev/null) ]] &&
    ok "truncated .gz: exit 1, named, no output" || bad "truncated .gz" "exit $rc"

# ---- stripping (Python str.strip() whitespace, \u00a0 and \u3000 included), empty documents,
# numeric ids, csv quoting
cat >"$tmp/strip.jsonl" <<'EOF'
{"id": "s1", "text": " \n\t\u00a0\u3000This is a document with no newlines.\r\n \u2028", "source": "t"}
{"id": "empty", "text": "  \n\t ", "source": "t"}
{"id": "zero", "text": "", "source": "t"}

{"id": 17, "text": "This is a document with no newlines.", "source": "t", "added": "x", "metadata": {"a": 1}}
{"id": "a,\"b\"", "text": "This is a document with no newlines.", "source": "t"}
EOF
tok "$tmp/strip" "$tmp/strip.jsonl"
got=$(ids "$tmp/strip/part-0-00000.npy" 2>/dev/null)
rows=$(zcat "$tmp/strip/part-0-00000.csv.gz" 2>/dev/null | tr '\n' ' ')
want_rows="0,10,s1,$tmp/strip.jsonl,1 10,20,17,$tmp/strip.jsonl,5 20,30,\"a,\"\"b\"\"\",$tmp/strip.jsonl,6 "
[[ $rc == 0 && $got == "$GOLD $EOS $GOLD $EOS $GOLD $EOS" ]] &&
    ok "whitespace stripped (ASCII and Unicode) before encoding" || bad "stripping" "exit $rc, got '$got'"
[[ $rows == "$want_rows" ]] && ok "empty documents and blank lines skipped; numeric id; csv quoting" ||
    bad "empty docs / rows" "rows '$rows'"
grep -q 'skipped 3 empty documents' "$tmp/err" && ok "summary counts the empty documents" ||
    bad "summary of empty documents" "not in stderr"

# ---- bad lines
{
    echo "$DOC"
    echo '{"id": "j", "text": "broken'
    echo '{"id": "n", "source": "t"}'
    printf '{"id": "u", "text": "bad \xff byte", "source": "t"}\n'
    echo '{"id": "t", "text": 5, "source": "t"}'
    echo "$DOC"
} >"$tmp/bad.jsonl"
tok "$tmp/bad" "$tmp/bad.jsonl"
[[ $rc == 1 ]] && grep -q "bad.jsonl:2: malformed JSON" "$tmp/err" && [[ -z $(ls -A "$tmp/bad") ]] &&
    ok "malformed JSON: exit 1 with FILE:LINE, no output left" || bad "malformed JSON" "exit $rc"
sed -n '1p;3p' "$tmp/bad.jsonl" >"$tmp/notext.jsonl"
tok "$tmp/notext" "$tmp/notext.jsonl"
[[ $rc == 1 ]] && grep -q 'notext.jsonl:2: no "text" field' "$tmp/err" && [[ -z $(ls -A "$tmp/notext") ]] &&
    ok "missing text: exit 1 with FILE:LINE" || bad "missing text" "exit $rc"
sed -n '1p;4p' "$tmp/bad.jsonl" >"$tmp/utf8.jsonl"
tok "$tmp/utf8" "$tmp/utf8.jsonl"
[[ $rc == 1 ]] && grep -q 'utf8.jsonl:2: invalid UTF-8' "$tmp/err" && [[ -z $(ls -A "$tmp/utf8") ]] &&
    ok "invalid UTF-8: exit 1 with FILE:LINE" || bad "invalid UTF-8" "exit $rc"
sed -n '1p;5p' "$tmp/bad.jsonl" >"$tmp/nonstr.jsonl"
tok "$tmp/nonstr" "$tmp/nonstr.jsonl"
[[ $rc == 1 ]] && grep -q 'nonstr.jsonl:2: "text" is not a string' "$tmp/err" &&
    ok "text not a string: exit 1 with FILE:LINE" || bad "text not a string" "exit $rc"
tok "$tmp/skip" --skip-bad "$tmp/bad.jsonl"
got=$(ids "$tmp/skip/part-0-00000.npy" 2>/dev/null)
rows=$(zcat "$tmp/skip/part-0-00000.csv.gz" 2>/dev/null | cut -d, -f5 | tr '\n' ' ')
[[ $rc == 0 && $got == "$GOLD $EOS $GOLD $EOS" && $rows == "1 6 " ]] &&
    grep -q 'malformed JSON 1, missing/mistyped field 2, invalid UTF-8 1' "$tmp/err" &&
    ok "--skip-bad: bad lines skipped and counted by kind" || bad "--skip-bad" "exit $rc, locs '$rows'"

# ---- parts roll at --max-tokens-per-file; a document never spans parts
for _ in 1 2 3; do echo "$DOC"; done >"$tmp/three.jsonl"
tok "$tmp/roll" --max-tokens-per-file 25 "$tmp/three.jsonl"
n0=$(($(stat -c %s "$tmp/roll/part-0-00000.npy" 2>/dev/null || echo 0) / 2))
n1=$(($(stat -c %s "$tmp/roll/part-0-00001.npy" 2>/dev/null || echo 0) / 2))
row=$(zcat "$tmp/roll/part-0-00001.csv.gz" 2>/dev/null)
[[ $rc == 0 && $n0 == 20 && $n1 == 10 && $row == "0,10,d1,$tmp/three.jsonl,3" ]] &&
    ok "--max-tokens-per-file 25: parts of 20 and 10 tokens" || bad "rolling" "exit $rc, $n0 + $n1 tokens"

{ echo "$DOC"; echo "$DOC"; echo '{"id": oops}'; } >"$tmp/late.jsonl"
tok "$tmp/late" --max-tokens-per-file 10 "$tmp/late.jsonl"
[[ $rc == 1 ]] && grep -q 'late.jsonl:3: malformed JSON' "$tmp/err" && [[ -z $(ls -A "$tmp/late") ]] &&
    ok "a bad line after completed parts: exit 1, those parts removed too" ||
    bad "late bad line" "exit $rc, left: $(ls "$tmp/late" | tr '\n' ' ')"

tok "$tmp/roll" "$tmp/three.jsonl"
[[ $rc == 2 ]] && grep -q 'already holds parts of group 0' "$tmp/err" && ok "refuses to mix with an earlier run's parts" ||
    bad "existing parts" "exit $rc, want 2"

# ---- --eos-id, ranks from the launcher's environment
tok "$tmp/eos" --eos-id 0 "$tmp/one.jsonl"
[[ $(ids "$tmp/eos/part-0-00000.npy" 2>/dev/null) == "$GOLD 0" ]] && ok "--eos-id overrides EOS" ||
    bad "--eos-id" "exit $rc"
echo '{"id": "r1", "text": "This is a document with no newlines.", "source": "t"}' >"$tmp/r1.jsonl"
OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 tok "$tmp/rank" "$tmp/one.jsonl" "$tmp/r1.jsonl" "$tmp/three.jsonl"
row=$(zcat "$tmp/rank/part-1-00000.csv.gz" 2>/dev/null)
[[ $rc == 0 && $row == "0,10,r1,$tmp/r1.jsonl,1" && $(ls "$tmp/rank") == $'part-1-00000.csv.gz\npart-1-00000.npy' ]] &&
    ok "rank 1 of 2: inputs i % 2 == 1 into part-1-*" || bad "ranks" "exit $rc, row '$row'"

# ---- --threads 1, 2, 3: identical bytes on the bundled sample
SAMPLE=data/sample/documents/train.jsonl.gz
if [[ -f $SAMPLE ]]; then
    same=1
    for t in 1 2 3; do
        tok "$tmp/th$t" --threads $t --max-tokens-per-file 200000 "$SAMPLE" || true
        [[ $rc == 0 ]] || same=0
    done
    for f in "$tmp"/th1/*; do
        for t in 2 3; do cmp -s "$f" "$tmp/th$t/$(basename "$f")" || same=0; done
    done
    n=$(ls "$tmp/th1" 2>/dev/null | wc -l)
    [[ $same == 1 && $n -ge 4 && $(ls "$tmp/th1") == "$(ls "$tmp/th3")" ]] &&
        ok "--threads 1/2/3: identical output on the sample ($((n / 2)) parts)" ||
        bad "--threads" "outputs differ or failed"
else
    bad "--threads" "$SAMPLE missing"
fi

no_tmp && ok "no .tmp files left anywhere" || bad "no .tmp" "$(find "$tmp" -name '*.tmp')"

echo "$passed passed, $failed failed"
[[ $failed == 0 ]]
