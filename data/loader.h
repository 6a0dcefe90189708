// loader: streams fixed-length training instances from token shards (ARCHITECTURE §4, §5):
// mmap'ed Dolma-format files, a global shuffle from (seed, epoch) that is the same for every
// world size, this rank's slice of each global batch, a read-ahead thread, epoch rollover.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/common.h"

typedef struct Loader Loader;

typedef struct {
    const char *glob;      // shard files; several globs may be separated by commas. Files are
                           // raw headerless little-endian ids (.npy as Dolma writes them) or
                           // real NumPy .npy files with a header (<u2 or <u4, 1-D)
    int seq_len;           // tokens per instance
    int vocab_size;        // every id must be < vocab_size; raw files are uint16 when
                           // vocab_size <= 65536, else uint32
    uint64_t seed;
    int shuffle;           // 1: global permutation per epoch; 0: file order (validation)
    int micro_batch;       // sequences per micro-batch (one rank)
    int global_batch;      // sequences per optimizer step (all ranks)
    int rank, world;       // this rank's slice; global_batch % (micro_batch * world) == 0
    int prefetch;          // micro-batches read ahead by a background thread (0: none)
} LoaderConfig;

// Where the data stream stands, at an optimizer-step boundary. World-size independent.
typedef struct {
    uint64_t seed;
    uint64_t epoch;          // 0-based
    uint64_t consumed;       // instances of this epoch consumed (a multiple of global_batch at
                             // step boundaries; set_pos accepts any count <= the epoch)
    char fingerprint[17];    // of the data set (16 hex digits)
} LoaderPos;

// Opens the data set: lists and mmaps the files, checks them (size a multiple of the dtype,
// a parseable .npy header, at least one global batch of instances). Errors name the file.
int loader_open(Loader **out, const LoaderConfig *cfg, MoetErr *err);
void loader_close(Loader *L);

// Fills tokens (micro_batch, seq_len) with this rank's next micro-batch and advances. At the
// end of an epoch the next epoch starts (new permutation); its last global_batch-incomplete
// instances are dropped. An id >= vocab_size is an error naming the file and token offset.
int loader_next(Loader *L, int32_t *tokens, MoetErr *err);

// The position after the last complete global batch; loader_set_pos continues from it exactly
// (any world size). A fingerprint or seed that differs from this data set's is an error unless
// force is set.
void loader_get_pos(const Loader *L, LoaderPos *pos);
int loader_set_pos(Loader *L, const LoaderPos *pos, int force, MoetErr *err);

// Facts about the data set.
uint64_t loader_num_instances(const Loader *L);   // per epoch, all files
uint64_t loader_num_tokens(const Loader *L);      // all files
uint64_t loader_batches_per_epoch(const Loader *L);
int loader_num_files(const Loader *L);
const char *loader_file_name(const Loader *L, int file);
const char *loader_fingerprint(const Loader *L);  // 16 hex digits

// Where instance `index` (0 <= index < instances per epoch) of `epoch` in the global order
// comes from: its file and first token (instance = tokens [offset, offset + seq_len)).
void loader_locate(const Loader *L, uint64_t epoch, uint64_t index, int *file,
                   uint64_t *token_offset);

// ---- for `moet trace` (data/trace.h): the order backwards, and the files' ids in place ----

// The inverse of loader_locate: the index in `epoch`'s global order of the instance that starts
// at token `token_offset` of `file` (a multiple of seq_len, below the file's last instance end).
uint64_t loader_index_of(const Loader *L, uint64_t epoch, int file, uint64_t token_offset);
uint64_t loader_file_tokens(const Loader *L, int file);    // ids in the file
uint64_t loader_file_instances(const Loader *L, int file); // floor(tokens / seq_len)
// The file's ids where they lie (mmap'ed, little-endian, *itemsize = 2 or 4 bytes each, not
// necessarily aligned); NULL for an empty file.
const uint8_t *loader_file_ids(const Loader *L, int file, int *itemsize);
// Copies ids [offset, offset + n) of `file` into out, each checked against vocab_size (an error
// names the file and the token offset, as loader_next's).
int loader_read(const Loader *L, int file, uint64_t offset, int n, int32_t *out, MoetErr *err);
