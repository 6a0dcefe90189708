// common: error reporting and small helpers shared by every module.
#include "train/common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static int log_rank = 0, log_world = 1;

int moet_errf(MoetErr *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void moet_set_log_rank(int rank, int world) {
    log_rank = rank;
    log_world = world;
}

void moet_log(const char *fmt, ...) {
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (log_world > 1) fprintf(stderr, "[rank %d] %s\n", log_rank, line);
    else fprintf(stderr, "%s\n", line);
}

void moet_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "moet: fatal: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

void *moet_malloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, (bytes + 63) / 64 * 64) != 0)
        moet_die("out of memory allocating %zu bytes", bytes);
    return p;
}

void *moet_calloc(size_t bytes) {
    void *p = moet_malloc(bytes);
    memset(p, 0, bytes);
    return p;
}

double moet_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int moet_mkdirs(const char *dir, MoetErr *err) {
    char p[4096];
    if (!dir[0]) return moet_errf(err, MOET_EUSAGE, "empty directory path");
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p)
        return moet_errf(err, MOET_EUSAGE, "%s: path too long", dir);
    for (char *s = p + 1;; s++) {
        if (*s == '/' || *s == '\0') {
            char c = *s;
            *s = '\0';
            if (mkdir(p, 0777) != 0 && errno != EEXIST)
                return moet_errf(err, MOET_EFAIL, "%s: cannot create directory: %s", p,
                                 strerror(errno));
            *s = c;
            if (c == '\0') break;
        }
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return moet_errf(err, MOET_EUSAGE, "%s: not a directory", dir);
    return 0;
}
