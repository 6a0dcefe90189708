#!/usr/bin/env python3
"""Checks `moet export-hf` and `moet generate` against HF transformers' OlmoeForCausalLM.

For a moet checkpoint CKPT:
  1. `moet export-hf CKPT DIR` (fp32); transformers loads DIR with no missing or unexpected
     weights.
  2. Logits and loss: B sequences of the checkpoint's seq_len random token ids are written as a
     token shard; `moet eval --batches 1 --save-logits` gives moet's logits and loss, HF's
     forward (labels = input_ids) gives its own. The logits must agree to 1e-4 of their
     largest magnitude and the losses to 1e-5 relative (both fp32 on the CPU; the differences
     are summation order: ~1e-6).
  3. Greedy generation: `moet generate --temperature 0 --json` and HF's generate(do_sample=False)
     from the same prompt must produce the same token ids (the padding ids beyond the
     tokenizer's vocabulary, which moet never samples, are suppressed in HF too).
  4. The other direction: a model that transformers initialises and saves (save_pretrained),
     with weights large enough (initializer_range 0.5) that greedy decoding does not settle
     into one repeated token, goes through `moet import-hf`; moet's logits and greedy
     generations from three prompts must equal transformers'.

Needs torch and transformers (pip); exits 77 ("skipped" for ctest) when they are missing.
usage: python3 tests/reference/check_hf_export.py MOET CKPT TOKENIZER.json [PROMPT]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM
    from transformers.utils import logging as hf_logging
except ImportError as e:  # not installed here: skipped, not passed
    print(f"check_hf_export: skipped ({e}); pip install torch transformers to run it")
    sys.exit(77)

B = 2
MAX_NEW = 24


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"check_hf_export: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def config_value(moet, ckpt, section, key):
    """A key of the checkpoint's config, from `moet inspect --config` (the INI text)."""
    out = run(moet, "inspect", ckpt, "--config")
    sec = None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            sec = s[1:-1]
        elif sec == section and "=" in s and s.split("=", 1)[0].strip() == key:
            return s.split("=", 1)[1].split("#")[0].strip()
    sys.exit(f"check_hf_export: [{section}] {key} not found in `moet inspect --config {ckpt}`")


def greedy_equal(moet, ckpt, tokenizer, model, vocab, prompt, label):
    """moet's and transformers' greedy continuations of prompt; prints and returns ok."""
    out = run(moet, "generate", ckpt, "--tokenizer", tokenizer, "--prompt", prompt,
              "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--json", "--set",
              "train.device=cpu")
    g = json.loads(out)
    pad_ids = [[i] for i in range(vocab, model.config.vocab_size)]
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        hf_out = model.generate(
            torch.tensor([g["prompt_ids"]]), max_new_tokens=MAX_NEW, do_sample=False,
            bad_words_ids=pad_ids or None, eos_token_id=eos, pad_token_id=eos)
    hf_new = hf_out[0, len(g["prompt_ids"]):].tolist()
    if eos is not None and eos in hf_new:  # moet does not print the end-of-text token
        hf_new = hf_new[: hf_new.index(eos)]
    ok = hf_new == g["ids"]
    print(f"{'ok  ' if ok else 'FAIL'} {label}: greedy generation of {len(g['ids'])} tokens from "
          f"{prompt!r} ({len(g['prompt_ids'])} prompt tokens): moet "
          f"{'=' if ok else '!='} transformers\n     moet: {g['ids']}\n     HF:   {hf_new}\n"
          f"     text: {g['text']!r}")
    return ok


def logits_equal(moet, ckpt, model, ids, tmp, label):
    """moet eval's logits and loss on the token rows ids against transformers'."""
    vocab_ok = ids.max() < 65536
    shard = os.path.join(tmp, f"tokens-{label}")
    os.mkdir(shard)
    ids.astype(np.uint16 if vocab_ok else np.uint32).tofile(
        os.path.join(shard, "part-0-00000.npy"))
    logits_path = os.path.join(tmp, f"logits-{label}.npy")
    out = run(moet, "eval", ckpt, "--data", os.path.join(shard, "*.npy"), "--batches", "1",
              "--json", "--save-logits", logits_path, "--set", f"train.micro_batch={ids.shape[0]}",
              "--set", f"train.global_batch={ids.shape[0]}",
              "--set", f"train.seq_len={ids.shape[1]}", "--set", "train.device=cpu")
    moet_loss = json.loads(out)["loss"]
    moet_logits = np.load(logits_path)
    with torch.no_grad():
        t = torch.from_numpy(ids)
        hf = model(input_ids=t, labels=t)
    hf_logits = hf.logits.float().numpy()
    scale = float(np.abs(hf_logits).max())
    diff = float(np.abs(moet_logits - hf_logits).max())
    rel = abs(moet_loss - float(hf.loss)) / abs(float(hf.loss))
    ok1 = moet_logits.shape == hf_logits.shape and diff <= 1e-4 * scale
    print(f"{'ok  ' if ok1 else 'FAIL'} {label}: logits {moet_logits.shape}: max |moet - HF| = "
          f"{diff:.3e} (max |logit| {scale:.3f}, tolerance {1e-4 * scale:.3e})")
    ok2 = rel <= 1e-5
    print(f"{'ok  ' if ok2 else 'FAIL'} {label}: loss: moet {moet_loss:.7f}, HF "
          f"{float(hf.loss):.7f} (relative difference {rel:.2e}, tolerance 1e-5)")
    return ok1 and ok2


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    moet, ckpt, tokenizer = sys.argv[1:4]
    prompt = sys.argv[4] if len(sys.argv) > 4 else "The Debian package"
    torch.manual_seed(0)
    seq_len = int(config_value(moet, ckpt, "train", "seq_len"))
    vocab = int(config_value(moet, ckpt, "model", "vocab_size"))
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        # 1. export and load
        hf_dir = os.path.join(tmp, "hf")
        run(moet, "export-hf", ckpt, hf_dir, "--tokenizer", tokenizer)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model, info = OlmoeForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        model.eval()
        bad = {k: v for k, v in info.items() if v}
        print(f"loaded {hf_dir} in transformers: {sum(p.numel() for p in model.parameters())} "
              f"parameters; loading info {bad or 'clean'}")
        if bad:
            failures += 1

        # 2. logits and loss on the same tokens
        rng = np.random.default_rng(1234)
        ids = rng.integers(0, vocab, size=(B, seq_len), dtype=np.int64)
        failures += not logits_equal(moet, ckpt, model, ids, tmp, "export-hf")

        # 3. greedy generation from a prompt
        failures += not greedy_equal(moet, ckpt, tokenizer, model, vocab, prompt, "export-hf")

        # 4. an HF-initialised model through import-hf
        cfg = model.config.to_dict()
        hf_cfg = OlmoeConfig(**{k: cfg[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "rms_norm_eps", "num_experts", "num_experts_per_tok", "norm_topk_prob",
            "eos_token_id", "pad_token_id", "tie_word_embeddings")}, initializer_range=0.5)
        torch.manual_seed(7)
        init = OlmoeForCausalLM(hf_cfg).eval()
        src = os.path.join(tmp, "hf-init")
        init.save_pretrained(src)
        shutil.copy(tokenizer, os.path.join(src, "tokenizer.json"))
        imported = os.path.join(tmp, "imported")
        run(moet, "import-hf", src, imported)
        ids = rng.integers(0, vocab, size=(B, seq_len), dtype=np.int64)
        failures += not logits_equal(moet, imported, init, ids, tmp, "import-hf")
        for p in (prompt, "import sqlite3\nconn = ", "It is a truth universally acknowledged"):
            failures += not greedy_equal(moet, imported, tokenizer, init, vocab, p, "import-hf")
    print(f"check_hf_export: {'passed' if failures == 0 else f'{failures} check(s) failed'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
