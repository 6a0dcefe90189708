// common: error reporting and small helpers shared by every module.
// Functions that can fail return 0 on success or an exit code (MOET_EUSAGE = 2 for usage and
// configuration errors, MOET_EFAIL = 1 for anything else) and leave a message in a MoetErr.
#pragma once
#include <stddef.h>
#include <stdint.h>

enum { MOET_OK = 0, MOET_EFAIL = 1, MOET_EUSAGE = 2 };

typedef struct {
    char msg[2048];
} MoetErr;

// Formats a message into err (if not NULL) and returns code, so that callers can write
// `return moet_errf(err, MOET_EUSAGE, "%s: [model] d_model: ...", path);`.
int moet_errf(MoetErr *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

// Process-wide logger: prints to stderr, prefixed with the rank when the world is > 1.
void moet_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void moet_set_log_rank(int rank, int world);

// Aborts with a message: only for programming errors (allocation failure, broken invariants).
void moet_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void *moet_malloc(size_t bytes);   // 64-byte aligned, dies on failure
void *moet_calloc(size_t bytes);   // 64-byte aligned and zeroed, dies on failure

double moet_time(void);            // monotonic seconds
// mkdir -p: creates dir and its missing parents; errors name the path (MOET_EUSAGE for a path
// too long or not a directory, MOET_EFAIL when mkdir fails).
int moet_mkdirs(const char *dir, MoetErr *err);
