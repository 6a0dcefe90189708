// dolma: reads Dolma JSONL documents (one JSON object a line: id, text, source required) from
// plain, gzip (multi-member) or zstd (multi-frame) files, chosen by the file's magic bytes, as
// numbered lines, and parses one line into a document with problems named by kind.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/common.h"

typedef struct DolmaReader DolmaReader;

// Opens path for reading lines. The compression is detected from the first bytes (1f 8b: gzip,
// 28 b5 2f fd: zstd, else plain text), so a misnamed file still reads.
int dolma_open(DolmaReader **out, const char *path, MoetErr *err);
void dolma_close(DolmaReader *r);

// Reads the next line (without its '\n'; NUL-terminated; valid until the next call) into *line
// and *len, with its 1-based number in *lineno. Returns 1 for a line, 0 at the end of the file,
// MOET_EFAIL (negated: -1) on a read or decompression error, with the message in err.
int dolma_next_line(DolmaReader *r, const char **line, size_t *len, long *lineno, MoetErr *err);

// Bytes of the file (compressed, as on disk) consumed so far: progress against the file size.
uint64_t dolma_bytes_in(const DolmaReader *r);

// Why a line is not a usable document. DOLMA_EMPTY is not an error: a document whose text is
// empty after stripping whitespace is skipped, as Dolma's tokenizer does.
typedef enum {
    DOLMA_DOC = 0,   // a document
    DOLMA_EMPTY,     // valid, but the stripped text is empty (or the line is blank)
    DOLMA_BAD_JSON,  // not a JSON object
    DOLMA_BAD_FIELD, // id / text / source missing or of the wrong type
    DOLMA_BAD_UTF8,  // the line is not valid UTF-8
    DOLMA_N_KINDS
} DolmaKind;

const char *dolma_kind_name(DolmaKind k); // "malformed JSON", "invalid UTF-8", ...

// A parsed document. The strings are owned by the DolmaDoc (dolma_doc_free); text points into
// them, already stripped of leading and trailing whitespace (Python's str.strip() set).
typedef struct {
    char *id;         // the "id" field; a number is written as JSON writes it ("17")
    char *source;     // the "source" field
    const char *text; // the stripped text, text_len bytes (not NUL-terminated after strip)
    size_t text_len;
    char *text_owned_; // private: the allocation text points into
} DolmaDoc;

// Parses one line. Returns DOLMA_DOC (doc filled), DOLMA_EMPTY, or a bad kind with a short
// reason in why (e.g. "\"text\" is not a string"); doc is left empty for all but DOLMA_DOC.
DolmaKind dolma_parse(const char *line, size_t len, DolmaDoc *doc, char *why, size_t why_n);
void dolma_doc_free(DolmaDoc *doc);

// 1 when s[0..n) is valid UTF-8 (no overlongs, no surrogates, at most U+10FFFF), else 0;
// *bad_at (if not NULL) gets the byte offset of the first invalid sequence.
int dolma_utf8_valid(const char *s, size_t n, size_t *bad_at);

// Strips Python str.strip() whitespace (Unicode White_Space as Python defines isspace) from
// both ends of the UTF-8 text s[0..n): sets *start and returns the stripped length.
size_t dolma_strip(const char *s, size_t n, size_t *start);
