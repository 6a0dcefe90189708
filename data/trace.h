// trace: training-data provenance (`moet trace`, ARCHITECTURE §5): which shard tokens and which
// documents each optimizer step of a run read, and where a token sequence occurs in the shards
// and at which steps it was trained on. The loader's order run forwards and backwards, the
// documents from each shard's .csv.gz rows, and a parallel scan of the mmap'ed shards.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "data/loader.h"
#include "train/common.h"

typedef struct Trace Trace;

// Opens the training set as the trainer does (cfg's glob, seq_len, vocab_size, seed and
// global_batch; the shuffle is on and the rank, world, micro_batch and prefetch fields are
// ignored: the global order does not depend on them). Errors are loader_open's.
int trace_open(Trace **out, const LoaderConfig *cfg, MoetErr *err);
void trace_close(Trace *t);
const Loader *trace_loader(const Trace *t);

// ---- steps ----

// One sequence of a global batch: tokens [offset, offset + seq_len) of `file`, which is the
// instance at `position` of its epoch's order.
typedef struct {
    int file;
    uint64_t offset;
    uint64_t position;
} TraceSeq;

// Step `step` (>= 1, as the trainer counts: step s reads the (s-1)-th global batch of the
// stream, which runs epoch after epoch, each dropping its last incomplete global batch): its
// epoch and batch within the epoch, and its global_batch sequences in batch order into seqs.
// Sequence j went to rank (j / micro_batch) % world at accumulation step
// j / (micro_batch * world), for any micro_batch and world of the run.
void trace_step(const Trace *t, int64_t step, TraceSeq *seqs, uint64_t *epoch, uint64_t *batch);

// The step at which `epoch` reads the instance that starts at token inst_offset (a multiple of
// seq_len) of `file`, or 0 when the epoch drops it (it falls in the epoch's last, incomplete
// global batch).
int64_t trace_instance_step(const Trace *t, uint64_t epoch, int file, uint64_t inst_offset);

// ---- documents (the shard's .csv.gz: rows start,end,id,src,loc, as `moet tokenize` and
// Dolma write them; the file is the shard's name with .npy replaced by .csv.gz) ----

typedef struct {
    uint64_t start, end; // tokens of the shard, end exclusive (the document's EOS included)
    const char *id;      // the document's "id"
    const char *src;     // the file it was read from
    long loc;            // its 1-based line there
} TraceDoc;

// The documents of `file` that overlap its tokens [lo, hi), in order: *first and *n (pointing
// into the trace's table, valid until trace_close). The metadata is read on first use and
// checked (rows in token order, the last one ending at the shard's last token); an error names
// the file and the row. A shard without a .csv.gz gives *n = 0 and trace_docs_missing 1.
int trace_docs(Trace *t, int file, uint64_t lo, uint64_t hi, const TraceDoc **first, size_t *n,
               MoetErr *err);
int trace_docs_missing(const Trace *t, int file);
const char *trace_docs_path(const Trace *t, int file); // the .csv.gz trace_docs reads

// ---- search ----

#define TRACE_MAX_PATTERNS 4

typedef struct {
    int file;
    int pattern;     // which of the patterns matched
    uint64_t offset; // tokens [offset, offset + its length) of the file
} TraceHit;

typedef struct {
    size_t max_hits;       // hits returned: the first in (file, offset) order; all are counted
    uint64_t chunk_tokens; // tokens per unit of parallel work (0: 4M)
} TraceFindOpts;

typedef struct {
    uint64_t tokens; // scanned
    uint64_t hits;   // found in all (*n_hits <= max_hits of them are returned)
    double seconds;
    int threads;
} TraceFindStats;

// Finds every occurrence of each token sequence pats[i][0..lens[i]) (1 <= n_pats <=
// TRACE_MAX_PATTERNS, lens[i] >= 1) in every file of the data set, tails included. A parallel
// scan (OpenMP threads over chunks of the mmap'ed files, each the same work: one pass over
// the ids): each pattern is anchored at its largest id (BPE merges later, hence rarer, tokens
// get larger ids), blocks of ids without any anchor are skipped after one vectorized compare
// pass, and each anchor found is verified against the whole pattern. Cost: O(total tokens)
// reads, memory-bound: 2 or 4 bytes per token. *hits is malloc'ed (free it).
int trace_find(const Trace *t, const TraceFindOpts *o, const int32_t *const *pats,
               const size_t *lens, int n_pats, TraceHit **hits, size_t *n_hits, TraceFindStats *st,
               MoetErr *err);
