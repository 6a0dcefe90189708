#!/usr/bin/env bash
# hf: `moet export-hf` / `moet import-hf`. (a) import-hf(export-hf(x)) = x bit for bit, every
# tensor (the checksums of `moet inspect`), and the same eval loss; `train --init` accepts the
# import; (b) a dense model exports as a 1-expert top-1 MoE with the same eval loss, bit for
# bit; (c) a bf16 export imports with the eval loss within 1e-3; (d) a sharded folder (index +
# 2 shards) reads each tensor from the shard the index names; (e) errors: a missing tensor, a
# wrong shape, a truncated file exit 1 naming the tensor / file; unsupported config keys and
# bad usage exit 2. (That transformers loads the export: tests/reference/check_hf_export.py.)
# Usage, from the repository root (ctest does this): bash tests/cli/hf.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" hf "$@"
tokenize_sample

# train MODEL STEPS RUN: a short run of configs/MODEL.ini into $tmp/RUN
train() {
    "$MOET" train --config "configs/$1.ini" --set "data.train=$tmp/train/*.npy" \
        --set "data.valid=$tmp/valid/*.npy" --set "train.max_steps=$2" --set "checkpoint.every=$2" --set "checkpoint.dir=$tmp/$3" \
        >"$tmp/train.out" 2>"$tmp/err" || { bad "train $1 $2 steps" "exit $?"; finish; exit 1; }
}
# tensors CKPT: the /model tensors' names, shapes and checksums
tensors() { "$MOET" inspect "$1" | grep '^  model/' | awk '{$(NF-1) = ""; print}'; }
# loss CKPT: eval loss (%.17g) on 3 micro-batches of 4 x 128 of the valid shards
loss() {
    "$MOET" eval "$1" --data "$tmp/valid/*.npy" --batches 3 --json --set train.micro_batch=4 \
        --set train.global_batch=8 2>>"$tmp/err" | grep -o '"loss":[^,]*' | sed 's/.*://'
}
# names FILE.safetensors: the tensor names in its JSON header (one a line)
names() {
    local n
    n=$(od -An -tu8 -N8 "$1" | tr -d ' ')
    tail -c +9 "$1" | head -c "$n" | grep -o '"[a-z_]*\.[^"]*":{' | sed 's/"\(.*\)":{/\1/'
}
B48=(--set train.micro_batch=4 --set train.global_batch=8)

# (a) MoE round trip, fp32
train tiny-moe 3 run
if "$MOET" export-hf "$tmp/run" "$tmp/hf" >"$tmp/export.out" 2>"$tmp/err" &&
   "$MOET" import-hf "$tmp/hf" "$tmp/imp" "${B48[@]}" >"$tmp/import.out" 2>"$tmp/err"; then
    want=$(tensors "$tmp/run")
    n=$(echo "$want" | wc -l)
    if [[ -n $want && $want == "$(tensors "$tmp/imp")" ]]; then
        ok "a: import-hf(export-hf(tiny-moe step 3)): all $n tensors bit-identical (checksums)"
    else
        bad "a: round trip tensors" "$(diff <(echo "$want") <(tensors "$tmp/imp") | head -4)"
    fi
    l1=$(loss "$tmp/run") l2=$(loss "$tmp/imp")
    if [[ -n $l1 && $l1 == "$l2" ]]; then ok "a: eval loss $l1 = $l2"
    else bad "a: eval loss" "$l1 vs $l2"; fi
    if [[ -f $tmp/hf/tokenizer.json && -f $tmp/hf/tokenizer_config.json &&
          -f $tmp/hf/generation_config.json ]] &&
       grep -q '"OlmoeForCausalLM"' "$tmp/hf/config.json" &&
       grep -q '"vocab_size":.50304' "$tmp/hf/config.json" &&
       grep -q '"eos_token":.*"<|endoftext|>"' "$tmp/hf/tokenizer_config.json" &&
       [[ $(names "$tmp/hf/model.safetensors" | grep -c 'mlp\.experts\.[0-9]*\.') -eq 48 ]]; then
        ok "a: $(grep -o '[0-9]* files.*tensors' "$tmp/export.out"), 48 per-expert"
    else
        bad "a: the exported folder" "$(ls "$tmp/hf" | tr '\n' ' ')"
    fi
    if "$MOET" train --config configs/tiny-moe.ini --init "$tmp/imp" --set train.max_steps=1 \
        --set "data.train=$tmp/train/*.npy" --set "data.valid=$tmp/valid/*.npy" \
        --set "checkpoint.dir=$tmp/init" \
        >/dev/null 2>"$tmp/err"; then
        ok "a: moet train --init accepts the imported checkpoint"
    else
        bad "a: train --init the import" "exit $?"
    fi
else
    bad "a: export-hf / import-hf tiny-moe" "exit $?"
fi

# (b) dense: one expert, top-1, zero router
train tiny-dense 2 dense
if "$MOET" export-hf "$tmp/dense" "$tmp/hfd" >/dev/null 2>"$tmp/err" &&
   "$MOET" import-hf "$tmp/hfd" "$tmp/impd" "${B48[@]}" >/dev/null 2>"$tmp/err"; then
    l1=$(loss "$tmp/dense") l2=$(loss "$tmp/impd")
    if [[ -n $l1 && $l1 == "$l2" ]] && grep -q '"num_experts":.1,' "$tmp/hfd/config.json"; then
        ok "b: tiny-dense as a 1-expert MoE: eval loss $l1 = $l2"
    else
        bad "b: dense round trip" "eval loss $l1 vs $l2"
    fi
else
    bad "b: export-hf / import-hf tiny-dense" "exit $?"
fi

# (c) bf16
if "$MOET" export-hf "$tmp/run" "$tmp/hf16" --dtype bf16 >/dev/null 2>"$tmp/err" &&
   "$MOET" import-hf "$tmp/hf16" "$tmp/imp16" "${B48[@]}" >/dev/null 2>"$tmp/err"; then
    l1=$(loss "$tmp/run") l2=$(loss "$tmp/imp16")
    s32=$(stat -c %s "$tmp/hf/model.safetensors") s16=$(stat -c %s "$tmp/hf16/model.safetensors")
    if awk -v a="$l1" -v b="$l2" 'BEGIN { d = a - b; exit !(a != "" && d < 1e-3 && d > -1e-3) }' &&
       [[ $((s16 * 2)) -lt $((s32 + 100000)) ]]; then
        ok "c: bf16 export ($s16 bytes, fp32 $s32): eval loss $l2 vs $l1, within 1e-3"
    else
        bad "c: bf16" "loss $l2 vs $l1, sizes $s16 / $s32"
    fi
else
    bad "c: export-hf --dtype bf16 / import-hf" "exit $?"
fi

# (d) sharded: the index sends embed_tokens and layer 0 to an fp32 shard, the rest to a bf16
# one: those tensors come back bit-identical, lm_head (bf16) does not
mkdir -p "$tmp/sh"
cp "$tmp/hf/config.json" "$tmp/sh/"
cp "$tmp/hf/model.safetensors" "$tmp/sh/model-00001-of-00002.safetensors"
cp "$tmp/hf16/model.safetensors" "$tmp/sh/model-00002-of-00002.safetensors"
# index NAME...: DIR/model.safetensors.index.json of the export's tensors but NAME...
index() {
    local dir=$1 sep= t f
    shift
    {
        echo '{"metadata": {}, "weight_map": {'
        for t in $(names "$tmp/hf/model.safetensors"); do
            [[ " $* " == *" $t "* ]] && continue
            f=model-00002-of-00002.safetensors
            [[ $t == model.embed_tokens.* || $t == model.layers.0.* ]] &&
                f=model-00001-of-00002.safetensors
            printf '%s  "%s": "%s"' "$sep" "$t" "$f"
            sep=$',\n'
        done
        echo '}}'
    } >"$dir/model.safetensors.index.json"
}
index "$tmp/sh"
if "$MOET" import-hf "$tmp/sh" "$tmp/impsh" >"$tmp/sh.out" 2>"$tmp/err"; then
    a=$(tensors "$tmp/run" | grep -E 'embed_tokens|layers\.0\.')
    b=$(tensors "$tmp/impsh" | grep -E 'embed_tokens|layers\.0\.')
    if [[ $a == "$b" && $(tensors "$tmp/run" | grep lm_head) != "$(tensors "$tmp/impsh" |
          grep lm_head)" ]] && grep -q sharded "$tmp/sh.out"; then
        ok "d: sharded (index + 2 shards): $(echo "$a" | wc -l) tensors from the fp32 shard\
 bit-identical, the rest from the bf16 shard"
    else
        bad "d: sharded import" "the tensors do not come from the shards the index names"
    fi
else
    bad "d: import-hf of a sharded folder" "exit $?"
fi

# (e) errors
# expect NAME STATUS PATTERN DIR [ARGS]: import-hf DIR exits STATUS with PATTERN in its message
expect() {
    local name=$1 want=$2 pat=$3 dir=$4
    shift 4
    rm -rf "$tmp/out-e"
    "$MOET" import-hf "$dir" "$tmp/out-e" "$@" >/dev/null 2>"$tmp/err"
    local got=$?
    if [[ $got -eq $want ]] && grep -q -- "$pat" "$tmp/err"; then
        ok "e: $name: exit $got, $(head -c 150 "$tmp/err" | sed "s|$tmp|TMP|g")"
    else
        bad "e: $name" "exit $got (want $want), message lacks '$pat'"
    fi
}
mkdir -p "$tmp/miss" "$tmp/shape" "$tmp/trunc" "$tmp/tied"
cp "$tmp/sh/"*.json "$tmp/sh/"*.safetensors "$tmp/miss/"
index "$tmp/miss" model.layers.1.self_attn.k_norm.weight
expect "missing tensor" 1 "missing tensor model.layers.1.self_attn.k_norm.weight" "$tmp/miss"
sed 's/"intermediate_size":.*64,/"intermediate_size": 32,/' "$tmp/hf/config.json" \
    >"$tmp/shape/config.json"
ln -s "$tmp/hf/model.safetensors" "$tmp/shape/model.safetensors"
expect "wrong shape" 1 "tensor model.layers.0.mlp.experts.0.gate_proj.weight has shape \[64, 64\]" \
    "$tmp/shape"
cp "$tmp/hf/config.json" "$tmp/trunc/"
head -c 20000000 "$tmp/hf/model.safetensors" >"$tmp/trunc/model.safetensors"
expect "truncated file" 1 "trunc/model.safetensors: tensor .* out of the file's data range" \
    "$tmp/trunc"
sed 's/"tie_word_embeddings":.*false/"tie_word_embeddings": true/' "$tmp/hf/config.json" \
    >"$tmp/tied/config.json"
expect "tied embeddings" 2 '"tie_word_embeddings" is true: unsupported' "$tmp/tied"
"$MOET" import-hf "$tmp/hf" "$tmp/imp" >/dev/null 2>"$tmp/err"
r1=$?
"$MOET" export-hf "$tmp/run" >/dev/null 2>"$tmp/err2"
r2=$?
if [[ $r1 -eq 2 && $r2 -eq 2 ]] && grep -q "already holds a checkpoint" "$tmp/err" &&
   grep -q "needs CKPT and DIR" "$tmp/err2"; then
    ok "e: import into a folder with a checkpoint, export-hf without DIR: exit 2"
else
    bad "e: usage errors" "exit $r1 / $r2"
fi
finish
