#!/usr/bin/env python3
"""Compares bench_tokenizer (moet, C) with HF tokenizers on the same text and the same split
(--split lines: each line with its '\\n' is one document; --split paragraphs: each piece of
text.split('\\n\\n') with its '\\n\\n'): ids must be equal; prints MB/s and the ratio.

usage: bench/bench_tokenizer.py [--split lines|paragraphs] BENCH_BIN TEXT_FILE TOKENIZER.json [...]
"""
import os
import subprocess
import sys
import tempfile

HF_RUN = r"""
import sys, time, array
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
text = open(sys.argv[2], 'rb').read().decode('utf-8')
sep = '\n\n' if sys.argv[4] == 'paragraphs' else '\n'
docs = text.split(sep)
docs = [d + sep for d in docs[:-1]] + ([docs[-1]] if docs[-1] else [])
nbytes = len(text.encode('utf-8'))
t0 = time.perf_counter()
enc = tok.encode_batch(docs, add_special_tokens=False)
dt = time.perf_counter() - t0
ids = array.array('I', [i for e in enc for i in e.ids])
open(sys.argv[3], 'wb').write(ids.tobytes())
del enc
t0 = time.perf_counter()
fast = tok.encode_batch_fast(docs, add_special_tokens=False)   # no offsets (tokenizers >= 0.20)
dt_fast = time.perf_counter() - t0
assert [i for e in fast for i in e.ids] == ids.tolist()
print(f"{nbytes / dt / 1e6:.3f} {nbytes / dt_fast / 1e6:.3f} {len(ids)}")
"""


SPLIT = "lines"


def hf(tok, text, out, threads):
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "true"
    if threads == 1:
        env["RAYON_NUM_THREADS"] = "1"
    else:
        env.pop("RAYON_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-c", HF_RUN, tok, text, out, SPLIT], env=env, check=True,
                       capture_output=True, text=True)
    mbs, mbs_fast, n = r.stdout.split()
    return float(mbs), float(mbs_fast), int(n)


def moet(binary, tok, text, out, threads):
    r = subprocess.run([binary, tok, text, "--threads", str(threads), "--split", SPLIT, "--out", out], check=True,
                       capture_output=True, text=True)
    line = r.stdout.strip()
    return float(line.split()[-2]), int(line.split("tokens")[0].split()[-1])


def main():
    global SPLIT
    args = sys.argv[1:]
    if len(args) >= 2 and args[0] == "--split":
        SPLIT, args = args[1], args[2:]
    if len(args) < 3 or SPLIT not in ("lines", "paragraphs"):
        sys.exit(__doc__)
    binary, text, toks = args[0], args[1], args[2:]
    nthreads = os.cpu_count()
    print(f"text: {text} ({os.path.getsize(text) / 1e6:.1f} MB), split: {SPLIT}, threads: 1 and {nthreads}")
    print("| tokenizer | threads | moet MB/s | HF encode_batch MB/s | HF encode_batch_fast MB/s |"
          " moet / HF fast | tokens | ids equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ok = True
    with tempfile.TemporaryDirectory() as d:
        for tok in toks:
            for th in sorted({1, nthreads}):
                a, b = os.path.join(d, "moet.u32"), os.path.join(d, "hf.u32")
                m, nm = moet(binary, tok, text, a, th)
                h, hfast, nh = hf(tok, text, b, th)
                eq = nm == nh and open(a, "rb").read() == open(b, "rb").read()
                ok &= eq
                name = os.path.basename(tok).removesuffix(".json")
                print(f"| {name} | {th} | {m:.2f} | {h:.2f} | {hfast:.2f} | {m / hfast:.2f}x | {nm} |"
                      f" {'yes' if eq else 'NO'} |")
                sys.stdout.flush()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
