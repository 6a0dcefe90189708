// bench_loader: the data loader's throughput from the page cache. Writes uint16 shards (or takes
// a glob of existing ones), reads them once to warm the page cache, then times loader_next over
// one epoch (seq_len 4096, micro_batch 8, shuffled) with read-ahead 4 and with none, and the
// time a trainer spends inside loader_next when 1 ms of work separates the calls.
//   bench_loader [--tokens N] [--shards S] [--dir D] [--glob PATTERN] [--keep]
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/loader.h"

enum { SEQ_LEN = 4096, MICRO_BATCH = 8, VOCAB = 50304 };

static void write_shards_(const char *dir, long long tokens, int shards) {
    mkdir(dir, 0755);
    long long per = tokens / shards;
    uint16_t *buf = malloc((size_t)per * sizeof(uint16_t));
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (int f = 0; f < shards; f++) {
        long long n = per - 1000 * f; // unequal lengths, with tails
        for (long long i = 0; i < n; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            buf[i] = (uint16_t)((s >> 33) % VOCAB);
        }
        char path[1024];
        snprintf(path, sizeof path, "%s/part-0-%05d.npy", dir, f);
        FILE *fp = fopen(path, "wb");
        if (!fp || fwrite(buf, sizeof(uint16_t), (size_t)n, fp) != (size_t)n) {
            fprintf(stderr, "bench_loader: cannot write %s\n", path);
            exit(1);
        }
        fclose(fp);
    }
    free(buf);
}

// Reads every file once so that the timed pass measures the loader, not the disk.
static void warm_(const Loader *L) {
    static char buf[1 << 20];
    for (int f = 0; f < loader_num_files(L); f++) {
        int fd = open(loader_file_name(L, f), O_RDONLY);
        if (fd < 0) continue;
        while (read(fd, buf, sizeof buf) > 0) {
        }
        close(fd);
    }
}

// Busy-waits `seconds`: stands in for the training step between two loader_next calls.
static void compute_(double seconds) {
    double end = moet_time() + seconds;
    while (moet_time() < end) {
    }
}

// Times loader_next over `calls` micro-batches (0: one epoch), with `step_s` seconds of
// simulated work between calls; with work, only the time inside loader_next counts.
static int run_(const char *glob, int prefetch, int warm, long calls, double step_s) {
    LoaderConfig cfg = {.glob = glob,
                        .seq_len = SEQ_LEN,
                        .vocab_size = VOCAB,
                        .seed = 42,
                        .shuffle = 1,
                        .micro_batch = MICRO_BATCH,
                        .global_batch = MICRO_BATCH,
                        .rank = 0,
                        .world = 1,
                        .prefetch = prefetch};
    Loader *L;
    MoetErr err;
    if (loader_open(&L, &cfg, &err)) {
        fprintf(stderr, "bench_loader: %s\n", err.msg);
        return 1;
    }
    if (warm) {
        warm_(L);
        printf("data: %d files, %llu tokens, %llu instances of %d, fingerprint %s\n",
               loader_num_files(L), (unsigned long long)loader_num_tokens(L),
               (unsigned long long)loader_num_instances(L), SEQ_LEN, loader_fingerprint(L));
    }
    if (calls == 0) calls = (long)loader_batches_per_epoch(L); // global batch = micro-batch
    int32_t *x = malloc((size_t)MICRO_BATCH * SEQ_LEN * sizeof(int32_t));
    double worst = 0, inside = 0;
    for (long i = 0; i < calls; i++) {
        if (step_s > 0) compute_(step_s);
        double t = moet_time();
        if (loader_next(L, x, &err)) {
            fprintf(stderr, "bench_loader: %s\n", err.msg);
            return 1;
        }
        t = moet_time() - t;
        inside += t;
        if (t > worst) worst = t;
    }
    double tokens = (double)calls * MICRO_BATCH * SEQ_LEN;
    if (step_s > 0)
        printf("prefetch %d, %.1f ms of work between calls: %ld micro-batches, %.1f us inside "
               "loader_next per micro-batch (worst %.1f us)\n",
               prefetch, step_s * 1e3, calls, inside / calls * 1e6, worst * 1e6);
    else
        printf("prefetch %d: %ld micro-batches of %dx%d in %.3f s: %.1f M tokens/s, "
               "%.1f us per micro-batch (worst %.1f us)\n",
               prefetch, calls, MICRO_BATCH, SEQ_LEN, inside, tokens / inside / 1e6,
               inside / calls * 1e6, worst * 1e6);
    free(x);
    loader_close(L);
    return 0;
}

int main(int argc, char **argv) {
    long long tokens = 200000000;
    int shards = 8, keep = 0;
    const char *dir = "/tmp/moet-bench-loader", *glob = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--shards") && i + 1 < argc)
            shards = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--glob") && i + 1 < argc)
            glob = argv[++i];
        else if (!strcmp(argv[i], "--keep"))
            keep = 1;
        else {
            fprintf(stderr,
                    "usage: %s [--tokens N] [--shards S] [--dir D] [--glob PATTERN] "
                    "[--keep]\n",
                    argv[0]);
            return 2;
        }
    }
    char own_glob[1100];
    if (!glob) {
        double t = moet_time();
        write_shards_(dir, tokens, shards);
        printf("wrote %d shards, %lld tokens, in %s (%.1f s)\n", shards, tokens, dir,
               moet_time() - t);
        snprintf(own_glob, sizeof own_glob, "%s/part-0-*.npy", dir);
        glob = own_glob;
    }
    int rc = run_(glob, 4, 1, 0, 0);            // one epoch, as fast as it goes
    if (!rc) rc = run_(glob, 0, 0, 0, 0);       // no thread: the read itself
    if (!rc) rc = run_(glob, 4, 0, 1000, 1e-3); // what a training step waits for
    if (glob == own_glob && !keep) {
        for (int f = 0; f < shards; f++) {
            char path[1100];
            snprintf(path, sizeof path, "%s/part-0-%05d.npy", dir, f);
            unlink(path);
        }
        rmdir(dir);
    }
    return rc;
}
