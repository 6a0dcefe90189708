// test_sample_data: the bundled sample end to end: `moet tokenize` on data/sample/documents
// (in-process, the same function the CLI calls), then the loader over the shards it wrote with
// the tiny-moe configuration: every instance once per epoch, every id < vocab, the instance
// count implied by the .npy sizes, and EOS tokens that match the documents.
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/loader.h"
#include "tests/testutil.h"
#include "train/cli.h"
#include "train/config.h"

static char dir_[256];

static uint64_t npy_tokens_(const char *dir, int *n_files) {
    uint64_t total = 0;
    *n_files = 0;
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n < 4 || strcmp(e->d_name + n - 4, ".npy") != 0) continue;
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(p, &st) == 0) total += (uint64_t)st.st_size / 2;  // uint16 ids
        (*n_files)++;
    }
    closedir(d);
    return total;
}

static void test_tokenize_then_load(void) {
    snprintf(dir_, sizeof dir_, "/tmp/moet_sample_XXXXXX");
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir_));
    char out[300];
    snprintf(out, sizeof out, "%s/train", dir_);
    char *argv[] = {"tokenize", "--tokenizer", "data/tokenizers/gpt-neox-olmo-dolma-v1_5.json",
                    "--out", out, "--threads", "2", "--quiet",
                    "data/sample/documents/train.jsonl.gz"};
    MoetErr err = {{0}};
    int rc = cmd_tokenize((int)(sizeof argv / sizeof argv[0]), argv, &err);
    if (rc) fprintf(stderr, "  %s\n", err.msg);
    CU_ASSERT_EQUAL_FATAL(rc, 0);

    Config c;
    CU_ASSERT_EQUAL_FATAL(config_from_cli(&c, "configs/tiny-moe.ini", 0, NULL, &err), 0);
    int n_files = 0;
    uint64_t tokens = npy_tokens_(out, &n_files);
    CU_ASSERT(n_files >= 1);
    printf("\n    %d shard(s), %llu tokens\n", n_files, (unsigned long long)tokens);

    char glob[320];
    snprintf(glob, sizeof glob, "%s/*.npy", out);
    LoaderConfig lc = {.glob = glob, .seq_len = c.seq_len, .vocab_size = c.vocab_size,
                       .seed = c.seed, .shuffle = 1, .micro_batch = c.micro_batch,
                       .global_batch = c.global_batch, .rank = 0, .world = 1, .prefetch = 2};
    Loader *L = NULL;
    rc = loader_open(&L, &lc, &err);
    if (rc) fprintf(stderr, "  %s\n", err.msg);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(loader_num_tokens(L), tokens);
    // one shard: floor(tokens / seq_len) instances
    if (n_files == 1) CU_ASSERT_EQUAL(loader_num_instances(L), tokens / (uint64_t)c.seq_len);

    uint64_t batches = loader_batches_per_epoch(L);
    int accum = c.global_batch / c.micro_batch;
    size_t mb = (size_t)c.micro_batch * c.seq_len;
    int32_t *buf = malloc(mb * sizeof(int32_t));
    uint64_t eos = 0, bad = 0;
    for (uint64_t b = 0; b < batches * (uint64_t)accum; b++) {
        CU_ASSERT_EQUAL_FATAL(loader_next(L, buf, &err), 0);
        for (size_t i = 0; i < mb; i++) {
            bad += buf[i] < 0 || buf[i] >= c.vocab_size;
            eos += buf[i] == c.eos_id;
        }
    }
    LoaderPos pos;
    loader_get_pos(L, &pos);
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT(eos > 0);  // documents end in EOS
    printf("    epoch %llu: %llu global batches, %llu EOS tokens seen\n",
           (unsigned long long)pos.epoch, (unsigned long long)batches,
           (unsigned long long)eos);
    CU_ASSERT_EQUAL(pos.epoch * batches + pos.consumed / (uint64_t)c.global_batch, batches);
    free(buf);
    loader_close(L);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir_);
    CU_ASSERT_EQUAL(system(cmd), 0);
}

int main(void) {
    const TuTest tests[] = {
        {"moet tokenize on data/sample, then the loader reads it", test_tokenize_then_load},
    };
    return tu_run("sample_data", tests, (int)(sizeof tests / sizeof tests[0]));
}
