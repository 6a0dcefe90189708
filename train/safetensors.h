// safetensors: read and write Hugging Face `.safetensors` files (8-byte little-endian header
// length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the raw tensor bytes).
// The reader mmaps the file and checks every entry up front; the writer converts fp32 to F32/BF16.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/common.h"

#define ST_MAX_DIMS 8

typedef enum { ST_F32, ST_BF16, ST_F16, ST_OTHER } StDtype;

typedef struct {
    char *name;
    char dtype_name[16]; // as in the header: "F32", "BF16", "I64", ...
    StDtype dtype;       // ST_OTHER: not readable as fp32 (st_read_f32 refuses it)
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t numel;
    uint64_t begin, end; // byte range, relative to the start of the data
} StTensor;

typedef struct {
    char *path;
    const uint8_t *map; // the whole file, read-only
    size_t size;
    size_t data_start; // 8 + header length
    int n;
    StTensor *t; // (n), in header order
} SafeTensors;

// Maps path and parses its header. Errors (naming the file, and the tensor where there is one):
// missing or unreadable file, file shorter than its header, header JSON malformed, an entry
// without dtype / shape / data_offsets, data_offsets out of the file's range or not matching
// shape x dtype size.
int st_open(SafeTensors **out, const char *path, MoetErr *err);
void st_close(SafeTensors *st);
// The entry called name, or NULL.
const StTensor *st_find(const SafeTensors *st, const char *name);
// Elements [first, first + count) of t (in row-major order) converted to fp32 into dst.
// F32, BF16 and F16 are accepted; another dtype is an error naming the tensor and the file.
int st_read_f32(const SafeTensors *st, const StTensor *t, uint64_t first, uint64_t count,
                float *dst, MoetErr *err);

// One tensor for st_write: fp32 source data, stored as dtype (ST_F32 or ST_BF16).
typedef struct {
    const char *name;
    StDtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const float *data; // numel floats, row-major
} StWriteTensor;

// Writes the n tensors to path (via path.tmp and a rename), header metadata
// {"format":"pt"}, the header padded with spaces to a multiple of 8. *bytes_out (may be NULL)
// receives the file size. BF16 rounds to nearest even; NaN stays NaN.
int st_write(const char *path, const StWriteTensor *t, int n, uint64_t *bytes_out, MoetErr *err);

// fp32 <-> half-width conversions (exposed for tests and other readers).
uint16_t st_f32_to_bf16(float x);
float st_bf16_to_f32(uint16_t h);
float st_f16_to_f32(uint16_t h);
