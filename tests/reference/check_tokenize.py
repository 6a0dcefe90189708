#!/usr/bin/env python3
"""Cross-checks `moet tokenize` output against HF `tokenizers`, the way `dolma tokens` does it.

Not part of ctest (needs `pip install tokenizers numpy`). For each input file, every line is
parsed with json, the text stripped with str.strip(), empty documents skipped, and the text
encoded with add_special_tokens=False followed by EOS; the concatenation over the inputs (in
order, for one rank) must equal the concatenated part-*.npy files (read with np.memmap, as OLMo
does), and the csv.gz rows must match start,end,id,src,loc.

usage: python3 tests/reference/check_tokenize.py TOKENIZER.json OUT_DIR INPUT...
"""
import csv
import glob
import gzip
import io
import json
import os
import sys

import numpy as np
from tokenizers import Tokenizer


def open_text(path):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="\n")
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard as zstd

        return io.TextIOWrapper(zstd.ZstdDecompressor().stream_reader(open(path, "rb")),
                                encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    tok = Tokenizer.from_file(sys.argv[1])
    out_dir, inputs = sys.argv[2], sys.argv[3:]
    eos = tok.token_to_id("<|endoftext|>")
    want_ids, want_rows = [], []
    for path in inputs:
        docs, locs = [], []
        with open_text(path) as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text = row["text"].strip()
                if not text:
                    continue
                docs.append((row["id"], text))
                locs.append(i)
        encs = tok.encode_batch([t for _, t in docs], add_special_tokens=False)
        for (doc_id, _), loc, enc in zip(docs, locs, encs):
            want_rows.append((len(enc.ids) + 1, str(doc_id), path, str(loc)))
            want_ids.extend(enc.ids)
            want_ids.append(eos)
    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.npy")))
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
    got_ids = np.concatenate([np.memmap(p, dtype=dtype, mode="r") for p in parts])
    got_rows = []
    for p in parts:
        with gzip.open(p[: -len(".npy")] + ".csv.gz", "rt", newline="") as f:
            for start, end, doc_id, src, loc in csv.reader(f):
                got_rows.append((int(end) - int(start), doc_id, src, loc))
    want = np.array(want_ids, dtype=dtype)
    ok = True
    if got_ids.shape != want.shape or not np.array_equal(got_ids, want):
        n = min(len(got_ids), len(want))
        diff = np.nonzero(got_ids[:n] != want[:n])[0]
        first = int(diff[0]) if len(diff) else n
        print(f"ids differ: got {len(got_ids)} tokens, want {len(want)}; first difference at {first}")
        ok = False
    if got_rows != want_rows:
        bad = next((i for i, (a, b) in enumerate(zip(got_rows, want_rows)) if a != b),
                   min(len(got_rows), len(want_rows)))
        print(f"csv rows differ: got {len(got_rows)}, want {len(want_rows)}; first at row {bad}: "
              f"{got_rows[bad] if bad < len(got_rows) else None} vs "
              f"{want_rows[bad] if bad < len(want_rows) else None}")
        ok = False
    print(f"{'OK' if ok else 'MISMATCH'}: {len(want_rows)} documents, {len(want)} tokens, "
          f"{len(parts)} parts")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
