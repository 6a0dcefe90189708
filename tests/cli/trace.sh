#!/usr/bin/env bash
# trace: `moet trace` on a tiny-moe run of 300 steps stopped at step 6 (checkpoints at 3 and 6):
# (a) --step N from the checkpoint lists the 8 sequences of step N, the same as from the config
# alone, for every trained step; (b) --find on words of a document that step 4 read reports that
# document at step 4 ("trained"), and a sentence read later reports its step as "not yet trained
# on", which the config's trace of that step confirms; (c) a sentence absent from the data: no
# hit; (d) a step beyond the checkpoint: exit 2 naming its step; (e) shards added, renamed:
# exit 2 naming the fingerprint, and the original shards trace again; (f) usage errors.
# (That the sequences are what each rank's loader reads, at world 1 and 2: tests/test_trace.c.)
# Usage, from the repository root (ctest does this): bash tests/cli/trace.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" trace "$@"
tokenize_sample

sets=(--set "data.train=$tmp/train/*.npy" --set "data.valid=$tmp/valid/*.npy")
timeout 300 "$MOET" train --config configs/tiny-moe.ini "${sets[@]}" --set train.max_steps=300 \
    --set train.eval_every=0 --set checkpoint.every=3 --set "checkpoint.dir=$tmp/run" \
    --stop-at 6 >"$tmp/train.out" 2>"$tmp/err" ||
    { bad "train tiny-moe to step 6" "exit $?"; finish; exit 1; }
cfg=(--config configs/tiny-moe.ini "${sets[@]}" --set train.max_steps=300)

# the sequences array of a --step --json answer
sequences() { sed 's/.*"sequences"://' "$1"; }

# --- (a) steps from the checkpoint = steps from the config ------------------------------------
fails=""
for s in 1 2 3 4 5 6; do
    if ! "$MOET" trace "$tmp/run" --step $s --json >"$tmp/ck$s.json" 2>"$tmp/err" ||
        ! "$MOET" trace "${cfg[@]}" --step $s --json >"$tmp/cf$s.json" 2>>"$tmp/err"; then
        fails+=" step $s: exit status"
    elif [[ $(grep -o '"index":' "$tmp/ck$s.json" | wc -l) -ne 8 ]] ||
        ! grep -q "\"step\":$s,\"status\":\"trained\"" "$tmp/ck$s.json" ||
        ! grep -q "\"step\":$s,\"status\":\"planned\"" "$tmp/cf$s.json" ||
        [[ $(sequences "$tmp/ck$s.json") != "$(sequences "$tmp/cf$s.json")" ]]; then
        fails+=" step $s: $(head -c 300 "$tmp/ck$s.json")"
    fi
done
"$MOET" trace "$tmp/run" --step 2 >"$tmp/step2.txt" 2>"$tmp/err"
if [[ -z $fails ]] &&
    grep -Eq '^step 2 of .*/step00000006.h5 \(trained; the checkpoint is at step 6\): epoch 0, global batch 1 of [0-9]+; 8 sequences x 128 tokens' "$tmp/step2.txt" &&
    [[ $(grep -c '^seq [0-7]: .*part-0-00000.npy tokens \[' "$tmp/step2.txt") -eq 8 ]] &&
    grep -Eq '^  [^ ]+ \(data/sample/documents/train.jsonl.gz:[0-9]+\) tokens \[[0-9]+, [0-9]+\) of its [0-9]+: "' "$tmp/step2.txt"; then
    ok "a: steps 1-6 from the checkpoint = from the config (8 sequences each); $(head -c 60 "$tmp/step2.txt")..."
else
    bad "a: --step" "${fails:-$(head -3 "$tmp/step2.txt")}"
fi

# --- (b) --find: a document that step 4 read, and one read later ------------------------------
"$MOET" trace "$tmp/run" --step 4 --chars 400 --json >"$tmp/s4.json" 2>"$tmp/err"
doc=$(grep -o '"documents":\[{"id":"[^"]*"' "$tmp/s4.json" | head -1 | sed 's/.*"id":"//; s/"$//')
# six words of letters from that document's part of sequence 0; the first five, so that the
# last one is whole
words=$(sed 's/"text":"/\n/' "$tmp/s4.json" | sed -n 2p | grep -oE '( [A-Za-z]+){6}' | head -1 |
    sed -E 's/^ //; s/ [A-Za-z]+$//')
"$MOET" trace "$tmp/run" --find "$words" --json >"$tmp/find.json" 2>"$tmp/find.err"
rc=$?
if [[ $rc -eq 0 && -n $words && -n $doc ]] &&
    sed 's/{"file":/\n&/g' "$tmp/find.json" | grep -F "\"id\":\"$doc\"" |
    grep -q '"step":4,"status":"trained"' &&
    grep -Eq '^moet trace: scanned [0-9]+ tokens of 1 file in [0-9.]+ s: [0-9]+M tokens/s' "$tmp/find.err"; then
    ok "b: \"$words\" (step 4, sequence 0): found in $doc, step 4, trained; $(cat "$tmp/find.err")"
else
    bad "b: --find words of step 4" "exit $rc, words '$words', doc '$doc': $(head -c 600 "$tmp/find.json")"
fi

text="It is a truth universally acknowledged"
"$MOET" trace "$tmp/run" --find "$text" --json >"$tmp/truth.json" 2>"$tmp/err"
later=$(grep -o '"step":[0-9]*,"status":"not yet trained on","start":[0-9]*,"end":[0-9]*,"sequence_start":[0-9]*' "$tmp/truth.json")
lstep=$(sed -E 's/"step":([0-9]+).*/\1/' <<<"$later")
lseq=$(sed -E 's/.*"sequence_start":([0-9]+)/\1/' <<<"$later")
if grep -q '"hits_total":1,' "$tmp/truth.json" && grep -q '"id":"prideprejudice-1"' "$tmp/truth.json" &&
    [[ -n $lstep && $lstep -gt 6 ]] &&
    "$MOET" trace "${cfg[@]}" --step "$lstep" --json >"$tmp/later.json" 2>"$tmp/err" &&
    grep -q "\"start\":$lseq,\"end\":$((lseq + 128)),[^]]*\"id\":\"prideprejudice-1\"" "$tmp/later.json"; then
    ok "b: \"$text\": prideprejudice-1, not yet trained on: step $lstep, whose sequence at token $lseq holds it"
else
    bad "b: --find a later sentence" "'$later': $(head -c 600 "$tmp/truth.json")"
fi

# --- (c) absent ---------------------------------------------------------------------------------
"$MOET" trace "$tmp/run" --find "purple elephants quantize the moon" >"$tmp/none.txt" 2>"$tmp/err"
rc=$?
if [[ $rc -eq 0 ]] && grep -q '): 0 hits$' "$tmp/none.txt"; then
    ok "c: a sentence not in the data: 0 hits"
else
    bad "c: absent sentence" "exit $rc: $(head -2 "$tmp/none.txt")"
fi

# --- (d) beyond the run --------------------------------------------------------------------------
"$MOET" trace "$tmp/run" --step 7 >/dev/null 2>"$tmp/err"
r1=$?
"$MOET" trace "$tmp/run/step00000003.h5" --step 4 >/dev/null 2>"$tmp/err2"
r2=$?
if [[ $r1 -eq 2 && $r2 -eq 2 ]] && grep -q "step 7 is beyond the run: .* is at step 6" "$tmp/err" &&
    grep -q "step 4 is beyond the run: .*step00000003.h5 is at step 3" "$tmp/err2"; then
    ok "d: a step after the checkpoint's: exit 2, $(head -1 "$tmp/err" | sed "s|$tmp|TMP|g")"
else
    bad "d: beyond the run" "exit $r1 / $r2: $(cat "$tmp/err" "$tmp/err2" | head -2)"
fi

# --- (e) changed shards --------------------------------------------------------------------------
cp "$tmp/train/part-0-00000.npy" "$tmp/train/part-0-00001.npy"
cp "$tmp/train/part-0-00000.csv.gz" "$tmp/train/part-0-00001.csv.gz"
"$MOET" trace "$tmp/run" --step 1 >/dev/null 2>"$tmp/err"
r1=$?
"$MOET" trace "$tmp/run" --find "$text" >/dev/null 2>"$tmp/err2"
r2=$?
mv "$tmp/train/part-0-00000.npy" "$tmp/part.npy" # now one shard again, under another name
"$MOET" trace "$tmp/run" --step 1 >/dev/null 2>"$tmp/err3"
r3=$?
rm "$tmp/train/part-0-00001.npy"
mv "$tmp/part.npy" "$tmp/train/part-0-00000.npy"
"$MOET" trace "$tmp/run" --step 1 >/dev/null 2>"$tmp/err4"
r4=$?
if [[ $r1 -eq 2 && $r2 -eq 2 && $r3 -eq 2 && $r4 -eq 0 ]] &&
    grep -q "fingerprint .* (.*: 2 files, .*) differs from .* the one the run recorded" "$tmp/err" &&
    grep -q "fingerprint" "$tmp/err2" && grep -q "fingerprint .*: 1 file," "$tmp/err3"; then
    ok "e: a shard added / renamed: exit 2 ($(head -c 90 "$tmp/err" | sed "s|$tmp|TMP|g")...); restored: exit 0"
else
    bad "e: fingerprint" "exit $r1 / $r2 / $r3 / $r4: $(cat "$tmp/err" "$tmp/err3" "$tmp/err4" | head -3)"
fi

# --- (f) usage -----------------------------------------------------------------------------------
codes=""
"$MOET" trace --help >"$tmp/help.txt" 2>&1
codes+="$? "
"$MOET" trace "$tmp/run" >/dev/null 2>&1
codes+="$? "
"$MOET" trace "$tmp/run" --step 0 >/dev/null 2>&1
codes+="$? "
"$MOET" trace "$tmp/run" --step 1 --find x >/dev/null 2>&1
codes+="$? "
"$MOET" trace "$tmp/run" "${cfg[@]}" --step 1 >/dev/null 2>&1
codes+="$? "
mkdir "$tmp/empty"
"$MOET" trace "$tmp/empty" --step 1 >/dev/null 2>"$tmp/err"
codes+="$?"
if [[ $codes == "0 2 2 2 2 1" ]] && grep -q "^usage: moet trace RUN --step N" "$tmp/help.txt" &&
    grep -q "HINT: a run without a checkpoint yet: moet trace --config FILE" "$tmp/err"; then
    ok "f: --help 0; no --step/--find, --step 0, both, RUN and --config: 2; no checkpoint: 1"
else
    bad "f: usage" "exit codes $codes: $(head -2 "$tmp/err")"
fi
finish
