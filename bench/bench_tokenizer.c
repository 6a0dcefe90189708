// bench_tokenizer: encode throughput of one tokenizer.json on a text file split into lines
// (each line with its '\n' is one document) or paragraphs (--split paragraphs: each document
// ends with a "\n\n", as Python's text.split("\n\n")), as bench_tokenizer.py splits it for HF.
// Usage: bench_tokenizer TOKENIZER.json TEXT_FILE [--threads N] [--split lines|paragraphs]
//        [--repeat R] [--out IDS.u32]   (ids of all documents in order, little-endian uint32,
//        no EOS; the time printed is the best of R passes, default 3)
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer.h"

typedef struct {
    const Tokenizer *t;
    const char *text;
    const size_t *cut; // document d is text[cut[d] .. cut[d+1])
    size_t d0, d1;
    TokIds ids;
    int rc;
    MoetErr err;
} Work;

static void *encode_range(void *arg) {
    Work *w = arg;
    for (size_t d = w->d0; d < w->d1 && !w->rc; d++)
        w->rc = tokenizer_encode(w->t, w->text + w->cut[d], w->cut[d + 1] - w->cut[d], &w->ids,
                                 &w->err);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_tokenizer TOKENIZER.json TEXT_FILE [--threads N] "
                        "[--split lines|paragraphs] [--out IDS.u32]\n");
        return 2;
    }
    int nt = 1;
    const char *out = NULL;
    int paragraphs = 0, repeat = 3;
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            nt = atoi(argv[++i]);
        else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc)
            out = argv[++i];
        else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc)
            repeat = atoi(argv[++i]);
        else if (strcmp(argv[i], "--split") == 0 && i + 1 < argc)
            paragraphs = strcmp(argv[++i], "paragraphs") == 0;
        else {
            fprintf(stderr, "bench_tokenizer: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (nt < 1) nt = 1;
    MoetErr err;
    Tokenizer *t;
    double t0 = moet_time();
    if (tokenizer_load(&t, argv[1], &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    double t_load = moet_time() - t0;
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open\n", argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    size_t n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc(n + 1);
    if (fread(text, 1, n, f) != n) return 1;
    fclose(f);
    size_t nd = 0, cap = 1024;
    size_t *cut = malloc(cap * sizeof(size_t));
    cut[nd++] = 0;
    for (size_t i = 0; i < n; i++) {
        int end = text[i] == '\n';
        if (end && paragraphs) { // non-overlapping "\n\n" from the left, as str.split
            end = i + 1 < n && text[i + 1] == '\n';
            if (end) i++;
        }
        if (end || i + 1 >= n) {
            if (nd == cap) cut = realloc(cut, (cap *= 2) * sizeof(size_t));
            cut[nd++] = i + 1 < n ? i + 1 : n;
        }
    }
    size_t docs = nd - 1;
    Work *w = calloc((size_t)nt, sizeof(Work));
    pthread_t *th = malloc((size_t)nt * sizeof(pthread_t));
    // Contiguous ranges of equal bytes, so that the ids come out in order.
    size_t d = 0;
    for (int k = 0; k < nt; k++) {
        w[k] = (Work){.t = t, .text = text, .cut = cut, .d0 = d};
        size_t target = n * (size_t)(k + 1) / (size_t)nt;
        while (d < docs && cut[d + 1] <= target) d++;
        if (k == nt - 1) d = docs;
        w[k].d1 = d;
    }
    size_t ntok = 0;
    int rc = 0;
    double dt = 1e30;
    for (int r = 0; r < (repeat < 1 ? 1 : repeat) && !rc; r++) {
        for (int k = 0; k < nt; k++) w[k].ids.n = 0;
        t0 = moet_time();
        for (int k = 0; k < nt; k++) pthread_create(&th[k], NULL, encode_range, &w[k]);
        ntok = 0;
        for (int k = 0; k < nt; k++) {
            pthread_join(th[k], NULL);
            if (w[k].rc) {
                fprintf(stderr, "%s\n", w[k].err.msg);
                rc = 1;
            }
            ntok += w[k].ids.n;
        }
        double e = moet_time() - t0;
        if (e < dt) dt = e;
    }
    printf("bench_tokenizer: %s  %zu bytes  %zu %s  %zu tokens  threads %d  load %.2f s  "
           "encode %.3f s  %.2f MB/s\n",
           argv[1], n, docs, paragraphs ? "paragraphs" : "lines", ntok, nt, t_load, dt,
           (double)n / dt / 1e6);
    if (out && !rc) {
        FILE *o = fopen(out, "wb");
        if (!o) {
            fprintf(stderr, "%s: cannot write\n", out);
            return 1;
        }
        for (int k = 0; k < nt; k++)
            for (size_t i = 0; i < w[k].ids.n; i++) {
                uint32_t v = (uint32_t)w[k].ids.ids[i];
                uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16),
                                (uint8_t)(v >> 24)};
                fwrite(b, 1, 4, o);
            }
        fclose(o);
    }
    for (int k = 0; k < nt; k++) tokids_free(&w[k].ids);
    free(w);
    free(th);
    free(cut);
    free(text);
    tokenizer_free(t);
    return rc;
}
