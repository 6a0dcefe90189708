// tokenizer: HF `tokenizer.json` byte-level BPE (GPT-2, GPT-NeoX / OLMo, OLMo-2 dolma2),
// encode and decode, with ids equal to HF `tokenizers` (added tokens, NFC, the GPT-2 and cl100k
// pre-tokenizer regexes, merge ranks). A loaded Tokenizer is read-only: encode is thread-safe.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/common.h"

typedef struct Tokenizer Tokenizer;

// A growable id buffer; reuse one per thread to avoid allocations.
typedef struct {
    int32_t *ids;
    size_t n, cap;
} TokIds;

void tokids_free(TokIds *b);

// Loads path (a tokenizer.json). Errors name the file and what is unsupported or malformed.
int tokenizer_load(Tokenizer **out, const char *path, MoetErr *err);
void tokenizer_free(Tokenizer *t);

// Appends the ids of UTF-8 text[0..len) to out (no EOS, no BOS; as HF encode with
// add_special_tokens=False). Invalid UTF-8 is an error (MOET_EFAIL), nothing appended.
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, TokIds *out, MoetErr *err);

// Decodes ids to UTF-8 (malloc'ed, NUL-terminated; *len_out without the NUL). Byte sequences
// that are not valid UTF-8 come out as U+FFFD, as HF's decode does.
char *tokenizer_decode(const Tokenizer *t, const int32_t *ids, size_t n, size_t *len_out);

int tokenizer_vocab_size(const Tokenizer *t);   // largest id + 1 (added tokens included)
// The id of a token string (e.g. "<|endoftext|>"), or -1.
int tokenizer_token_id(const Tokenizer *t, const char *token);
// The token string of an id as tokenizer.json spells it (e.g. "<|endoftext|>", "Ġthe"), or
// NULL for an id the file does not define.
const char *tokenizer_token_string(const Tokenizer *t, int id);
// The EOS id: the added token "<|endoftext|>" where it exists, else -1.
int tokenizer_eos_id(const Tokenizer *t);

// Test hook: the pre-tokenizer's pieces of text[0..len) (already normalized, no added tokens),
// as piece end offsets in bytes (piece i is [ends[i-1], ends[i]), ends[-1] = 0) appended to
// ends. force_regex = 1 uses the Oniguruma path on the file's pattern instead of the hand
// scanner (both must agree). len must be < 2^31.
int tokenizer_pretokenize(const Tokenizer *t, const char *text, size_t len, int force_regex,
                          TokIds *ends, MoetErr *err);
