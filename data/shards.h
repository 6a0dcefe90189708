// shards: writes tokenized documents as Dolma / OLMo token shards: DIR/part-<G>-<NNNNN>.npy
// (raw headerless little-endian ids, uint16 when vocab <= 65536 else uint32; np.memmap reads
// it) and DIR/part-<G>-<NNNNN>.csv.gz (rows start,end,id,src,loc), rolling at a token limit.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/common.h"

// Dolma's `dolma tokens` default max_size: 2^30 tokens a part.
#define SHARDS_DEFAULT_MAX_TOKENS ((uint64_t)1 << 30)

typedef struct ShardWriter ShardWriter;

// Prepares to write group `group` into dir (created if missing). group_digits is the width of
// <G> (Dolma: the digits of the number of groups). Parts are written as *.tmp and renamed to
// their final names only when complete, so a file under a final name is always whole.
// Fails (MOET_EUSAGE) if dir already holds parts of this group: mixing two runs is never right.
int shards_open(ShardWriter **out, const char *dir, int group, int group_digits, int vocab_size,
                uint64_t max_tokens, MoetErr *err);

// Appends one document: ids[0..n) (its EOS included) and its csv row (id, src, loc). A document
// never spans two parts: one that does not fit starts the next part (a document longer than
// max_tokens gets a part of its own). Ids outside [0, vocab) are an error.
int shards_write_doc(ShardWriter *w, const int32_t *ids, size_t n, const char *id, const char *src,
                     long loc, MoetErr *err);

// Completes the open part (if any): renames its files to their final names.
int shards_close(ShardWriter *w, MoetErr *err);
// Frees w; the .tmp files of a part not completed by shards_close are removed (on failure
// elsewhere nothing half-written is left). NULL is a no-op.
void shards_free(ShardWriter *w);
// On failure: removes every part this writer completed (and the open part's .tmp files), so
// that a failed run leaves nothing under a final name, then frees w. NULL is a no-op.
void shards_discard(ShardWriter *w);

int shards_parts_done(const ShardWriter *w);  // parts renamed to their final names
uint64_t shards_tokens(const ShardWriter *w); // tokens written in all parts
int shards_dtype_bytes(const ShardWriter *w); // 2 (uint16) or 4 (uint32)
