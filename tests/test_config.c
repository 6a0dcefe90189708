// test_config: the configuration module. Every shipped config loads and validates; the INI
// text of a config reads back to the same Config; --set overrides and type-checks; every kind
// of bad input fails with MOET_EUSAGE and a message naming the file, line, key and reason.
// Runs with the repository root as working directory (ctest sets it).
#include "train/config.h"

#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/testutil.h"

static char tmpdir[] = "/tmp/moet-test-config-XXXXXX";
static char written[128][512]; // files to remove at the end
static int n_written;

static int contains_(const char *msg, const char *sub) {
    return strstr(msg, sub) != NULL;
}

// CU_ASSERT that msg contains sub, printing both when it does not.
#define ASSERT_MSG_HAS(msg, sub)                                                                   \
    do {                                                                                           \
        int ok_ = contains_((msg), (sub));                                                         \
        if (!ok_) fprintf(stderr, "\n  message: %s\n  lacks:   %s\n", (msg), (sub));               \
        CU_ASSERT(ok_);                                                                            \
    } while (0)

static const char *write_file_(const char *name, const char *text) {
    CU_ASSERT_FATAL(n_written < 128);
    char *path = written[n_written++];
    snprintf(path, sizeof written[0], "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    CU_ASSERT_FATAL(f != NULL);
    fputs(text, f);
    fclose(f);
    return path;
}

// Compares two Configs byte for byte, ignoring which keys were given.
static int same_config_(const Config *a, const Config *b) {
    Config x = *a, y = *b;
    memset(x.given_, 0, sizeof x.given_);
    memset(y.given_, 0, sizeof y.given_);
    return memcmp(&x, &y, sizeof x) == 0;
}

static char *to_ini_(const Config *c) {
    int n = config_to_ini(c, NULL, 0);
    char *text = malloc((size_t)n + 1);
    CU_ASSERT_FATAL(text != NULL);
    CU_ASSERT_EQUAL(config_to_ini(c, text, n + 1), n);
    CU_ASSERT_EQUAL((int)strlen(text), n);
    return text;
}

// ---- shipped configs ----

static void test_shipped_configs_validate(void) {
    const char *named[] = {"configs/tiny-dense.ini", "configs/tiny-moe.ini",
                           "configs/olmo-1b-dense.ini", "configs/olmoe-1b-7b.ini",
                           "configs/bench-cpu-moe.ini"};
    for (size_t i = 0; i < sizeof named / sizeof named[0]; i++) {
        int ok = access(named[i], R_OK) == 0;
        if (!ok) fprintf(stderr, "\n  missing %s (run from the repository root)\n", named[i]);
        CU_ASSERT(ok);
    }
    glob_t g;
    CU_ASSERT_FATAL(glob("configs/*.ini", 0, NULL, &g) == 0);
    CU_ASSERT(g.gl_pathc >= 5);
    for (size_t i = 0; i < g.gl_pathc; i++) {
        Config c;
        MoetErr err = {{0}};
        int rc = config_from_cli(&c, g.gl_pathv[i], 0, NULL, &err);
        if (rc) fprintf(stderr, "\n  %s: %s\n", g.gl_pathv[i], err.msg);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT_EQUAL(c.padded_vocab % 128, 0);
        CU_ASSERT(c.padded_vocab >= c.vocab_size && c.padded_vocab < c.vocab_size + 128);
        CU_ASSERT_EQUAL(c.head_dim * c.n_heads, c.d_model);
    }
    globfree(&g);
}

static void test_olmoe_values(void) {
    Config c;
    MoetErr err = {{0}};
    CU_ASSERT_EQUAL_FATAL(config_from_cli(&c, "configs/olmoe-1b-7b.ini", 0, NULL, &err), 0);
    CU_ASSERT_EQUAL(c.n_layers, 16);
    CU_ASSERT_EQUAL(c.d_model, 2048);
    CU_ASSERT_EQUAL(c.n_heads, 16);
    CU_ASSERT_EQUAL(c.head_dim, 128);
    CU_ASSERT_EQUAL(c.vocab_size, 50280);
    CU_ASSERT_EQUAL(c.padded_vocab, 50304);
    CU_ASSERT_EQUAL(c.max_seq_len, 4096);
    CU_ASSERT_EQUAL(c.seq_len, 4096);
    CU_ASSERT_EQUAL(c.n_experts, 64);
    CU_ASSERT_EQUAL(c.top_k, 8);
    CU_ASSERT_EQUAL(c.expert_d_ff, 1024);
    CU_ASSERT_EQUAL(c.norm_topk_prob, 0);
    CU_ASSERT_EQUAL(c.lb_coef, 0.01f);
    CU_ASSERT_EQUAL(c.z_coef, 0.001f);
    CU_ASSERT_EQUAL(c.rope_theta, 10000.0f);
    CU_ASSERT_EQUAL(c.norm_eps, 1e-5f);
    CU_ASSERT_EQUAL(c.lr, 4e-4f);
    CU_ASSERT_EQUAL(c.min_lr, 5e-5f);
    CU_ASSERT_EQUAL(c.warmup_steps, 2000);
    CU_ASSERT_STRING_EQUAL(c.schedule, "cosine");
    CU_ASSERT_EQUAL(c.beta1, 0.9f);
    CU_ASSERT_EQUAL(c.beta2, 0.95f);
    CU_ASSERT_EQUAL(c.eps, 1e-8f);
    CU_ASSERT_EQUAL(c.weight_decay, 0.1f);
    CU_ASSERT_EQUAL(c.grad_clip, 1.0f);
    CU_ASSERT_EQUAL(c.global_batch, 1024);
    CU_ASSERT_EQUAL(c.micro_batch, 1);
    CU_ASSERT_EQUAL(c.eos_id, 50279);
    CU_ASSERT_EQUAL(c.ep, 8);
    CU_ASSERT_STRING_EQUAL(c.comm, "auto");
    CU_ASSERT_STRING_EQUAL(c.device, "cuda");

    CU_ASSERT_EQUAL_FATAL(config_from_cli(&c, "configs/tiny-moe.ini", 0, NULL, &err), 0);
    CU_ASSERT_EQUAL(c.padded_vocab, 50304);
    CU_ASSERT_EQUAL(c.head_dim, 16);
    CU_ASSERT_EQUAL(c.n_experts, 8);
    CU_ASSERT_EQUAL(c.top_k, 2);
    CU_ASSERT_STRING_EQUAL(c.device, "cpu");
    CU_ASSERT_EQUAL_FATAL(config_from_cli(&c, "configs/tiny-dense.ini", 0, NULL, &err), 0);
    CU_ASSERT_EQUAL(c.n_experts, 0);
    CU_ASSERT_EQUAL(c.d_ff, 256);
    CU_ASSERT_EQUAL_FATAL(config_from_cli(&c, "configs/bench-cpu-moe.ini", 0, NULL, &err), 0);
    CU_ASSERT_EQUAL(c.d_model, 512);
    CU_ASSERT_EQUAL(c.n_experts, 16);
    CU_ASSERT_EQUAL(c.top_k, 4);
    CU_ASSERT_EQUAL(c.padded_vocab, 50304);
}

// ---- defaults ----

static void test_defaults(void) {
    Config c;
    config_defaults(&c);
    CU_ASSERT_EQUAL(c.rope_theta, 10000.0f);
    CU_ASSERT_EQUAL(c.norm_eps, 1e-5f);
    CU_ASSERT_EQUAL(c.init_std, 0.02f);
    CU_ASSERT_EQUAL(c.norm_topk_prob, 0);
    CU_ASSERT_EQUAL(c.lb_coef, 0.01f);
    CU_ASSERT_EQUAL(c.z_coef, 0.001f);
    CU_ASSERT_STRING_EQUAL(c.router, "softmax");       // OLMoE
    CU_ASSERT_STRING_EQUAL(c.lb_scope, "micro_batch"); // OLMoE
    CU_ASSERT_EQUAL(c.bias_update_rate, 0.0f);         // no expert bias
    CU_ASSERT_EQUAL(c.seed, 42u);
    CU_ASSERT_STRING_EQUAL(c.device, "cpu");
    CU_ASSERT_EQUAL(c.eval_every, 0);
    CU_ASSERT_EQUAL(c.eval_batches, 16);
    CU_ASSERT_EQUAL(c.log_every, 1);
    CU_ASSERT_EQUAL(c.lr, 4e-4f);
    CU_ASSERT_EQUAL(c.min_lr, 5e-5f);
    CU_ASSERT_EQUAL(c.warmup_steps, 2000);
    CU_ASSERT_STRING_EQUAL(c.schedule, "cosine");
    CU_ASSERT_EQUAL(c.beta1, 0.9f);
    CU_ASSERT_EQUAL(c.beta2, 0.95f);
    CU_ASSERT_EQUAL(c.eps, 1e-8f);
    CU_ASSERT_EQUAL(c.weight_decay, 0.1f);
    CU_ASSERT_EQUAL(c.grad_clip, 1.0f);
    CU_ASSERT_STRING_EQUAL(c.train, "");
    CU_ASSERT_STRING_EQUAL(c.valid, "");
    CU_ASSERT_STRING_EQUAL(c.tokenizer, "");
    CU_ASSERT_EQUAL(c.eos_id, 50279);
    CU_ASSERT_STRING_EQUAL(c.ckpt_dir, "checkpoints/run");
    CU_ASSERT_EQUAL(c.ckpt_every, 1000);
    CU_ASSERT_EQUAL(c.keep_last, 3);
    CU_ASSERT_EQUAL(c.keep_every, 0);
    CU_ASSERT_EQUAL(c.model_only, 0);
    CU_ASSERT_EQUAL(c.ep, 1);
    CU_ASSERT_STRING_EQUAL(c.comm, "auto");
    CU_ASSERT_STRING_EQUAL(c.metrics, "metrics.jsonl");

    // the defaults alone lack the model's shape: the first required key is named
    MoetErr err = {{0}};
    CU_ASSERT_EQUAL(config_validate(&c, "defaults", &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "defaults: [model] d_model: missing (required)");
}

// Code that fills the fields itself (no INI text, so no given_ flags) validates too.
static void test_fields_set_in_code(void) {
    Config c;
    MoetErr err = {{0}};
    config_defaults(&c);
    c.d_model = 64, c.n_layers = 2, c.n_heads = 4, c.vocab_size = 1000, c.max_seq_len = 32;
    c.n_experts = 4, c.top_k = 2, c.expert_d_ff = 32;
    c.seq_len = 32, c.micro_batch = 2, c.global_batch = 4, c.max_steps = 3, c.eos_id = 0;
    int rc = config_validate(&c, "code", &err);
    if (rc) fprintf(stderr, "\n  %s\n", err.msg);
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT_EQUAL(c.padded_vocab, 1024);
    CU_ASSERT_EQUAL(c.head_dim, 16);

    config_defaults(&c);
    c.d_model = 64, c.n_layers = 2, c.n_heads = 4, c.vocab_size = 1000, c.max_seq_len = 32;
    c.seq_len = 32, c.micro_batch = 2, c.global_batch = 4, c.max_steps = 3, c.eos_id = 0;
    CU_ASSERT_EQUAL(config_validate(&c, "code", &err), MOET_EUSAGE); // n_experts not set
    ASSERT_MSG_HAS(err.msg, "code: [moe] n_experts: missing (required)");
    c.n_experts = 0; // dense, so d_ff is needed
    CU_ASSERT_EQUAL(config_validate(&c, "code", &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "code: [model] d_ff: missing (required when [moe] n_experts = 0");
    c.d_ff = 128;
    CU_ASSERT_EQUAL(config_validate(&c, "code", &err), 0);
}

// ---- round trip ----

static void check_round_trip_(const Config *c, const char *what) {
    char *text = to_ini_(c);
    Config d;
    MoetErr err = {{0}};
    int rc = config_load_string(&d, text, what, &err);
    if (!rc) rc = config_validate(&d, what, &err);
    if (rc) fprintf(stderr, "\n  %s: %s\n", what, err.msg);
    CU_ASSERT_EQUAL(rc, 0);
    char *again = to_ini_(&d);
    int same_text = strcmp(text, again) == 0, same = same_config_(c, &d);
    if (!same_text || !same)
        fprintf(stderr, "\n  %s does not read back the same:\n%s\n----\n%s\n", what, text, again);
    CU_ASSERT(same_text);
    CU_ASSERT(same);
    free(text);
    free(again);
}

static void test_round_trip(void) {
    glob_t g;
    CU_ASSERT_FATAL(glob("configs/*.ini", 0, NULL, &g) == 0);
    for (size_t i = 0; i < g.gl_pathc; i++) {
        Config c;
        MoetErr err = {{0}};
        CU_ASSERT_EQUAL_FATAL(config_from_cli(&c, g.gl_pathv[i], 0, NULL, &err), 0);
        check_round_trip_(&c, g.gl_pathv[i]);
    }
    globfree(&g);

    // values that are hard to write back: odd floats, the largest seed, strings with blanks,
    // quotes, ';' and '#', and empty strings
    char *sets[] = {"optim.lr=0.1",
                    "optim.min_lr=1.40129846e-45",
                    "model.rope_theta=3.4e38",
                    "model.norm_eps=1e-6",
                    "moe.lb_coef=0.30000001",
                    "optim.beta2=0.99999994",
                    "optim.weight_decay=-0",
                    "train.seed=18446744073709551615",
                    "moe.norm_topk_prob=true",
                    "data.train=\" data/with blanks/*.npy \"",
                    "data.valid=\"\"",
                    "data.tokenizer=\"\"quoted\"\"",
                    "checkpoint.dir=;odd#name",
                    "log.metrics=m;x.jsonl",
                    "train.eval_every=0"};
    Config c;
    MoetErr err = {{0}};
    int rc = config_from_cli(&c, "configs/tiny-moe.ini", (int)(sizeof sets / sizeof sets[0]), sets,
                             &err);
    if (rc) fprintf(stderr, "\n  %s\n", err.msg);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_STRING_EQUAL(c.train, " data/with blanks/*.npy ");
    CU_ASSERT_STRING_EQUAL(c.valid, "");
    CU_ASSERT_STRING_EQUAL(c.tokenizer, "\"quoted\"");
    CU_ASSERT_STRING_EQUAL(c.ckpt_dir, ";odd#name");
    CU_ASSERT_EQUAL(c.seed, UINT64_MAX);
    CU_ASSERT_EQUAL(c.lr, 0.1f);
    CU_ASSERT(c.min_lr > 0);
    check_round_trip_(&c, "odd values");

    // snprintf semantics: the length of the whole text, whatever fits, always terminated
    int n = config_to_ini(&c, NULL, 0);
    char small[16];
    CU_ASSERT_EQUAL(config_to_ini(&c, small, sizeof small), n);
    CU_ASSERT_EQUAL(strlen(small), sizeof small - 1);
    CU_ASSERT(strncmp(small, "[model]\nd_model", 15) == 0);
}

// ---- --set ----

static void test_set_overrides(void) {
    char *sets[] = {"optim.lr=3e-3", " train.device = cuda ",  "moe.norm_topk_prob=yes",
                    "train.seed=7",  "optim.lr=2e-3",          "moe.top_k = 3",
                    "parallel.ep=4", "checkpoint.model_only=1"};
    Config c;
    MoetErr err = {{0}};
    int rc = config_from_cli(&c, "configs/tiny-moe.ini", (int)(sizeof sets / sizeof sets[0]), sets,
                             &err);
    if (rc) fprintf(stderr, "\n  %s\n", err.msg);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.lr, 2e-3f); // the later --set wins
    CU_ASSERT_STRING_EQUAL(c.device, "cuda");
    CU_ASSERT_EQUAL(c.norm_topk_prob, 1);
    CU_ASSERT_EQUAL(c.seed, 7u);
    CU_ASSERT_EQUAL(c.top_k, 3);
    CU_ASSERT_EQUAL(c.ep, 4);
    CU_ASSERT_EQUAL(c.model_only, 1);
    CU_ASSERT_EQUAL(c.d_model, 64); // the file's other keys stay

    // --set alone, without a file, can make a whole config
    char *only[] = {"model.d_model=32",     "model.n_layers=1",     "model.n_heads=2",
                    "model.vocab_size=300", "model.max_seq_len=16", "moe.n_experts=0",
                    "model.d_ff=64",        "train.seq_len=16",     "train.micro_batch=1",
                    "train.global_batch=1", "train.max_steps=1",    "data.eos_id=0"};
    rc = config_from_cli(&c, NULL, (int)(sizeof only / sizeof only[0]), only, &err);
    if (rc) fprintf(stderr, "\n  %s\n", err.msg);
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT_EQUAL(c.padded_vocab, 384);
}

typedef struct {
    const char *set;
    const char *expect[3];
} SetCase;

static void test_set_errors(void) {
    const SetCase cases[] = {
        {"optim.lr=abc", {"--set optim.lr=abc: [optim] lr = abc: not a number"}},
        {"optim.lr=-1", {"--set optim.lr=-1: [optim] lr = -1: must be >= 0"}},
        {"model.d_model=12x", {"[model] d_model = 12x: not an integer"}},
        {"moe.norm_topk_prob=2", {"[moe] norm_topk_prob = 2: not a boolean"}},
        {"train.device=gpu", {"[train] device = gpu", "cpu|cuda"}},
        {"optimlr=1", {"--set optimlr=1: expected section.key=value"}},
        {"optim.lr", {"--set optim.lr: expected section.key=value"}},
        {"=1", {"expected section.key=value"}},
        {".lr=1", {"expected section.key=value"}},
        {"optim.=1", {"expected section.key=value"}},
        {"lr=1", {"expected section.key=value", "did you mean --set optim.lr=1?"}},
        {"optim.lrr=1", {"--set optim.lrr=1: [optim] lrr: unknown key", "did you mean lr?"}},
        {"optm.lr=1", {"--set optm.lr=1: [optm] lr: unknown section [optm]", "[optim]?"}},
        {"model.seq_len=64", {"[model] seq_len: unknown key", "seq_len belongs in [train]"}},
        {"data.train=a ;b", {"[data] train = a ;b", "comment"}},
        {"model.d_model=", {"[model] d_model: empty value"}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Config c;
        MoetErr err = {{0}};
        char *sets[] = {(char *)cases[i].set};
        CU_ASSERT_EQUAL(config_from_cli(&c, "configs/tiny-moe.ini", 1, sets, &err), MOET_EUSAGE);
        for (int j = 0; j < 3 && cases[i].expect[j]; j++)
            ASSERT_MSG_HAS(err.msg, cases[i].expect[j]);
    }
    // a --set that passes its own checks but breaks a rule between keys: named by the file
    Config c;
    MoetErr err = {{0}};
    char *sets[] = {"moe.top_k=9"};
    CU_ASSERT_EQUAL(config_from_cli(&c, "configs/tiny-moe.ini", 1, sets, &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "configs/tiny-moe.ini: [moe] top_k = 9 must be <= n_experts = 8");
}

// ---- bad INI files ----

// A small valid MoE config, as (section, key, value) rows, that each case below edits.
static const char *BASE[][3] = {
    {"model", "d_model", "64"},      {"model", "n_layers", "2"},
    {"model", "n_heads", "4"},       {"model", "vocab_size", "50280"},
    {"model", "max_seq_len", "128"}, {"moe", "n_experts", "8"},
    {"moe", "top_k", "2"},           {"moe", "expert_d_ff", "64"},
    {"train", "seq_len", "128"},     {"train", "micro_batch", "4"},
    {"train", "global_batch", "8"},  {"train", "max_steps", "10"},
    {"optim", "lr", "4e-4"},         {"data", "valid", "v/*.npy"},
    {"parallel", "ep", "1"},
};

typedef struct {
    const char *what;
    // edits: "sec.key=value" (replace or add), "-sec.key" (delete), "+line" (append a raw
    // line at the end), "^line" (insert a raw line at the top)
    const char *mods[4];
    const char *expect[3];
    int line_of; // the error names the line of mods[line_of]; -1: no line (whole-config check)
} BadCase;

typedef struct {
    char sec[32], key[32], val[300];
    int line;
} Row;

// Builds the INI text for the edits; *lines[i] gets the line where mods[i] ended up.
static void build_ini_(const char *const mods[4], char *out, size_t cap, int lines[4]) {
    Row rows[64];
    int n = 0;
    for (size_t i = 0; i < sizeof BASE / sizeof BASE[0]; i++, n++) {
        snprintf(rows[n].sec, sizeof rows[n].sec, "%s", BASE[i][0]);
        snprintf(rows[n].key, sizeof rows[n].key, "%s", BASE[i][1]);
        snprintf(rows[n].val, sizeof rows[n].val, "%s", BASE[i][2]);
    }
    int row_of[4] = {-1, -1, -1, -1};
    for (int m = 0; m < 4 && mods[m]; m++) {
        const char *s = mods[m];
        if (s[0] == '+' || s[0] == '^') continue;
        int del = s[0] == '-';
        if (del) s++;
        char sec[32], key[32];
        const char *dot = strchr(s, '.'), *eq = strchr(s, '=');
        snprintf(sec, sizeof sec, "%.*s", (int)(dot - s), s);
        snprintf(key, sizeof key, "%.*s", (int)((eq ? eq : s + strlen(s)) - dot - 1), dot + 1);
        int r = 0;
        while (r < n && (strcmp(rows[r].sec, sec) || strcmp(rows[r].key, key))) r++;
        if (del) {
            CU_ASSERT_FATAL(r < n);
            rows[r].sec[0] = '\0'; // dropped
            continue;
        }
        if (r == n) {
            snprintf(rows[n].sec, sizeof rows[n].sec, "%s", sec);
            snprintf(rows[n].key, sizeof rows[n].key, "%s", key);
            n++;
        }
        snprintf(rows[r].val, sizeof rows[r].val, "%s", eq + 1);
        row_of[m] = r;
    }
    size_t len = 0;
    int line = 0;
    out[0] = '\0';
#define EMIT_(...) (len += (size_t)snprintf(out + len, cap - len, __VA_ARGS__), line++)
    for (int m = 0; m < 4 && mods[m]; m++)
        if (mods[m][0] == '^') EMIT_("%s\n", mods[m] + 1), lines[m] = line;
    const char *done[16];
    int n_done = 0;
    for (int r = 0; r < n; r++) {
        if (!rows[r].sec[0]) continue;
        int seen = 0;
        for (int k = 0; k < n_done; k++) seen |= !strcmp(done[k], rows[r].sec);
        if (seen) continue;
        done[n_done++] = rows[r].sec;
        EMIT_("[%s]\n", rows[r].sec);
        for (int q = r; q < n; q++) {
            if (strcmp(rows[q].sec, rows[r].sec)) continue;
            EMIT_("%s = %s\n", rows[q].key, rows[q].val);
            rows[q].line = line;
        }
    }
    for (int m = 0; m < 4 && mods[m]; m++)
        if (mods[m][0] == '+') EMIT_("%s\n", mods[m] + 1), lines[m] = line;
#undef EMIT_
    for (int m = 0; m < 4 && mods[m]; m++)
        if (row_of[m] >= 0) lines[m] = rows[row_of[m]].line;
}

static const BadCase BAD[] = {
    // read errors: file:line
    {"unknown key",
     {"model.d_modle=64"},
     {"[model] d_modle: unknown key (known keys in [model]: d_model, n_layers", "d_model?"},
     0},
    {"unknown section",
     {"+[modle]", "+d_model = 64"},
     {"[modle] d_model: unknown section [modle]", "known sections: model, moe"},
     1},
    {"key outside a section",
     {"^d_model = 64"},
     {"d_model: key outside any [section]", "[model]"},
     0},
    {"duplicate key",
     {"+[model]", "+d_model = 64"},
     {"[model] d_model: duplicate key (first given on line 2)"},
     1},
    {"int with junk", {"model.d_model=12x"}, {"[model] d_model = 12x: not an integer"}, 0},
    {"int written as float",
     {"model.n_layers=1e99"},
     {"[model] n_layers = 1e99: not an integer"},
     0},
    {"int overflow",
     {"train.max_steps=99999999999"},
     {"[train] max_steps = 99999999999: out of "
      "range"},
     0},
    {"empty int", {"model.d_model="}, {"[model] d_model: empty value (expected an integer)"}, 0},
    {"float not a number", {"optim.lr=abc"}, {"[optim] lr = abc: not a number"}, 0},
    {"float overflow", {"optim.lr=1e99"}, {"[optim] lr = 1e99: out of range"}, 0},
    {"float nan", {"optim.lr=nan"}, {"[optim] lr = nan: not a finite number"}, 0},
    {"bad bool", {"moe.norm_topk_prob=maybe"}, {"[moe] norm_topk_prob = maybe: not a boolean"}, 0},
    {"negative seed", {"train.seed=-1"}, {"[train] seed = -1: must be >= 0"}, 0},
    {"seed overflow", {"train.seed=18446744073709551616"}, {"[train] seed", "out of range"}, 0},
    {"negative lr", {"optim.lr=-1"}, {"[optim] lr = -1: must be >= 0"}, 0},
    {"d_model 0", {"model.d_model=0"}, {"[model] d_model = 0: must be >= 1"}, 0},
    {"negative n_heads", {"model.n_heads=-4"}, {"[model] n_heads = -4: must be >= 1"}, 0},
    {"eps 0", {"optim.eps=0"}, {"[optim] eps = 0: must be > 0"}, 0},
    {"beta1 1", {"optim.beta1=1"}, {"[optim] beta1 = 1: must be < 1"}, 0},
    {"beta2 negative", {"optim.beta2=-0.5"}, {"[optim] beta2 = -0.5: must be >= 0"}, 0},
    {"seq_len 1", {"train.seq_len=1"}, {"[train] seq_len = 1: must be >= 2"}, 0},
    {"keep_last 0", {"checkpoint.keep_last=0"}, {"[checkpoint] keep_last = 0: must be >= 1"}, 0},
    {"device", {"train.device=gpu"}, {"[train] device = gpu: must be one of cpu|cuda"}, 0},
    {"comm", {"parallel.comm=gloo"}, {"[parallel] comm = gloo: must be one of auto|mpi|nccl"}, 0},
    {"nccl on cpu", {"parallel.comm=nccl"}, {"[parallel] comm = nccl needs [train] device = cuda"},
     -1},
    {"schedule", {"optim.schedule=step"}, {"[optim] schedule = step", "cosine|linear|constant"}, 0},
    {"empty dir", {"checkpoint.dir="}, {"[checkpoint] dir", "must not be empty"}, 0},
    {"'#' comment after a value",
     {"train.max_steps=10 # steps"},
     {"[train] max_steps = 10 # steps: not an integer", "' ;'"},
     0},
    {"syntax error", {"+d_model 64"}, {"cannot parse 'd_model 64'", "key = value"}, 0},
    {"unclosed section", {"+[model"}, {"cannot parse '[model'"}, 0},
    // whole-config checks: file, no line
    {"missing d_model", {"-model.d_model"}, {"[model] d_model: missing (required)"}, -1},
    {"missing n_experts", {"-moe.n_experts"}, {"[moe] n_experts: missing (required)"}, -1},
    {"missing seq_len", {"-train.seq_len"}, {"[train] seq_len: missing (required)"}, -1},
    {"missing max_steps", {"-train.max_steps"}, {"[train] max_steps: missing (required)"}, -1},
    {"dense without d_ff",
     {"moe.n_experts=0"},
     {"[model] d_ff: missing (required when [moe] n_experts = 0"},
     -1},
    {"dense with d_ff 0",
     {"moe.n_experts=0", "model.d_ff=0"},
     {"[model] d_ff = 0: must be >= 1 for a dense model"},
     -1},
    {"MoE without top_k",
     {"-moe.top_k"},
     {"[moe] top_k: missing (required when n_experts > 0)"},
     -1},
    {"MoE without expert_d_ff", {"-moe.expert_d_ff"}, {"[moe] expert_d_ff: missing (required"}, -1},
    {"d_model % n_heads",
     {"model.d_model=100", "model.n_heads=3"},
     {"[model] d_model = 100 is not divisible by n_heads = 3"},
     -1},
    {"odd head_dim", {"model.d_model=36"}, {"[model] head_dim", "= 9 is odd", "RoPE"}, -1},
    {"top_k > n_experts", {"moe.top_k=9"}, {"[moe] top_k = 9 must be <= n_experts = 8"}, -1},
    {"top_k 0", {"moe.top_k=0"}, {"[moe] top_k = 0: must be >= 1"}, -1},
    // load balancing (issue 11)
    {"router", {"moe.router=relu"}, {"[moe] router = relu: must be one of softmax|sigmoid"}, 0},
    {"lb_scope",
     {"moe.lb_scope=batch"},
     {"[moe] lb_scope = batch: must be one of micro_batch|global_batch"},
     0},
    {"negative bias_update_rate",
     {"moe.bias_update_rate=-0.001"},
     {"[moe] bias_update_rate = -0.001: must be >= 0"},
     0},
    {"bias_update_rate not a number",
     {"moe.bias_update_rate=fast"},
     {"[moe] bias_update_rate = fast: not a number"},
     0},
    {"sigmoid without norm_topk_prob",
     {"moe.router=sigmoid"},
     {"[moe] router = sigmoid needs norm_topk_prob = true"},
     -1},
    {"sigmoid router in a dense model",
     {"moe.n_experts=0", "model.d_ff=64", "moe.router=sigmoid"},
     {"[moe] router is set, but [moe] n_experts = 0"},
     -1},
    {"expert bias in a dense model",
     {"moe.n_experts=0", "model.d_ff=64", "moe.bias_update_rate=0.001"},
     {"[moe] bias_update_rate is set, but [moe] n_experts = 0"},
     -1},
    {"global lb in a dense model",
     {"moe.n_experts=0", "model.d_ff=64", "moe.lb_scope=global_batch"},
     {"[moe] lb_scope is set, but [moe] n_experts = 0"},
     -1},
    {"ep does not divide",
     {"parallel.ep=3"},
     {"[parallel] ep = 3 does not divide [moe] n_experts = 8"},
     -1},
    {"ep on a dense model",
     {"moe.n_experts=0", "model.d_ff=256", "parallel.ep=2"},
     {"[parallel] ep = 2", "n_experts = 0"},
     -1},
    {"global_batch % micro_batch",
     {"train.global_batch=10"},
     {"[train] global_batch = 10 is not divisible by micro_batch = 4"},
     -1},
    {"seq_len > max_seq_len",
     {"train.seq_len=256"},
     {"[train] seq_len = 256 must be <= [model] max_seq_len = 128"},
     -1},
    {"min_lr > lr", {"optim.min_lr=1e-3"}, {"[optim] min_lr = 0.001 must be <= lr = 0.0004"}, -1},
    {"eos_id >= vocab_size",
     {"data.eos_id=50280"},
     {"[data] eos_id = 50280 must be < [model] vocab_size = 50280"},
     -1},
    {"eval without valid",
     {"train.eval_every=10", "-data.valid"},
     {"[train] eval_every = 10 needs [data] valid"},
     -1},
    // only the first error is reported
    {"first of two bad values",
     {"model.d_model=abc", "optim.lr=abc"},
     {"[model] d_model = abc"},
     0},
    {"bad value before a syntax error",
     {"model.d_model=abc", "+garbage"},
     {"[model] d_model = abc"},
     0},
    {"syntax error before a bad value",
     {"^garbage", "model.d_model=abc"},
     {"cannot parse 'garbage'"},
     0},
    {"a bad value before bad consistency",
     {"model.d_model=100", "model.n_heads=3", "optim.lr=-1"},
     {"[optim] lr = -1"},
     2},
};

static void test_bad_files(void) {
    { // the unedited base is valid
        const char *none[4] = {0};
        char text[8192];
        int lines[4];
        build_ini_(none, text, sizeof text, lines);
        Config c;
        MoetErr err = {{0}};
        int rc = config_from_cli(&c, write_file_("base.ini", text), 0, NULL, &err);
        if (rc) fprintf(stderr, "\n  base: %s\n", err.msg);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
    }
    for (size_t i = 0; i < sizeof BAD / sizeof BAD[0]; i++) {
        const BadCase *b = &BAD[i];
        char text[8192], name[64], want[700];
        int lines[4] = {0};
        build_ini_(b->mods, text, sizeof text, lines);
        snprintf(name, sizeof name, "bad-%02zu.ini", i);
        const char *path = write_file_(name, text);
        Config c;
        MoetErr err = {{0}};
        int rc = config_from_cli(&c, path, 0, NULL, &err);
        if (rc != MOET_EUSAGE) fprintf(stderr, "\n  %s: rc %d (%s)\n", b->what, rc, err.msg);
        CU_ASSERT_EQUAL(rc, MOET_EUSAGE);
        if (b->line_of >= 0)
            snprintf(want, sizeof want, "%s:%d: ", path, lines[b->line_of]);
        else
            snprintf(want, sizeof want, "%s: ", path);
        int at_start = strncmp(err.msg, want, strlen(want)) == 0;
        if (!at_start) fprintf(stderr, "\n  %s: message does not start with '%s'\n", b->what, want);
        CU_ASSERT(at_start);
        for (int j = 0; j < 3 && b->expect[j]; j++) ASSERT_MSG_HAS(err.msg, b->expect[j]);
    }
}

static void test_file_level_errors(void) {
    Config c;
    MoetErr err = {{0}};
    CU_ASSERT_EQUAL(config_from_cli(&c, "configs/no-such-config.ini", 0, NULL, &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "cannot read config configs/no-such-config.ini: No such file");
    CU_ASSERT_EQUAL(config_from_cli(&c, "configs", 0, NULL, &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "configs");

    // a line longer than inih's buffer, and a path longer than an INI line can hold
    char text[1024], longval[400];
    memset(longval, 'x', 300);
    longval[300] = '\0';
    snprintf(text, sizeof text, "[model]\nd_model = 64\n[data]\ntrain = %s\n", longval);
    const char *path = write_file_("long-line.ini", text);
    CU_ASSERT_EQUAL(config_load_file(&c, path, &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, ":4: line is ");
    ASSERT_MSG_HAS(err.msg, "characters long");
    longval[170] = '\0';
    snprintf(text, sizeof text, "[data]\ntrain = %s\n", longval);
    CU_ASSERT_EQUAL(config_load_string(&c, text, "attr", &err), MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "attr:2: [data] train = xxx");
    ASSERT_MSG_HAS(err.msg, "too long (170 characters; at most 160)");

    // origin names INI text that is not a file (a checkpoint's config attribute)
    CU_ASSERT_EQUAL(config_load_string(&c, "[model]\nd_modle = 1\n", "ckpt.h5:/config", &err),
                    MOET_EUSAGE);
    ASSERT_MSG_HAS(err.msg, "ckpt.h5:/config:2: [model] d_modle: unknown key");
}

static void test_ini_dialect(void) {
    // BOM, CRLF, comments of both kinds, an inline ' ;' comment, indented keys, "key: value",
    // quoted empty string, case-insensitive booleans
    const char *text = "\xEF\xBB\xBF# a comment\r\n"
                       "; another\r\n"
                       "[model]\r\n"
                       "  d_model = 64\r\n"
                       "\tn_layers=2\r\n"
                       "n_heads : 4\r\n"
                       "vocab_size = 1000 ; the tokenizer's\r\n"
                       "max_seq_len = 32\r\n"
                       "[moe]\r\n"
                       "n_experts = 4\r\ntop_k = 2\r\nexpert_d_ff = 32\r\nnorm_topk_prob = TRUE\r\n"
                       "[train]\r\n"
                       "seq_len = 32\r\nmicro_batch = 2\r\nglobal_batch = 4\r\nmax_steps = 1\r\n"
                       "[data]\r\n"
                       "valid = \"\"\r\neos_id = 0\r\n";
    Config c;
    MoetErr err = {{0}};
    int rc = config_load_string(&c, text, "dialect", &err);
    if (!rc) rc = config_validate(&c, "dialect", &err);
    if (rc) fprintf(stderr, "\n  %s\n", err.msg);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.d_model, 64);
    CU_ASSERT_EQUAL(c.n_layers, 2);
    CU_ASSERT_EQUAL(c.n_heads, 4);
    CU_ASSERT_EQUAL(c.vocab_size, 1000);
    CU_ASSERT_EQUAL(c.norm_topk_prob, 1);
    CU_ASSERT_STRING_EQUAL(c.valid, "");

    // an indented line is a key of its own, never the continuation of the previous value
    rc = config_load_string(&c, "[model]\nd_model = 64\n  n_layers = 3\n", "indent", &err);
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT_EQUAL(c.d_model, 64);
    CU_ASSERT_EQUAL(c.n_layers, 3);

    // loading starts from the defaults again
    CU_ASSERT_EQUAL(config_load_string(&c, "[optim]\nlr = 1e-3\n", "a", &err), 0);
    CU_ASSERT_EQUAL(config_load_string(&c, "[optim]\nmin_lr = 0\n", "b", &err), 0);
    CU_ASSERT_EQUAL(c.lr, 4e-4f);
}

int main(void) {
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    const TuTest tests[] = {
        {"shipped configs load and validate", test_shipped_configs_validate},
        {"olmoe-1b-7b and tiny values", test_olmoe_values},
        {"defaults", test_defaults},
        {"fields set in code validate", test_fields_set_in_code},
        {"config_to_ini round trip", test_round_trip},
        {"--set overrides", test_set_overrides},
        {"--set errors", test_set_errors},
        {"bad INI files", test_bad_files},
        {"file-level errors", test_file_level_errors},
        {"INI dialect", test_ini_dialect},
    };
    int rc = tu_run("config", tests, (int)(sizeof tests / sizeof tests[0]));
    for (int i = 0; i < n_written; i++) unlink(written[i]);
    rmdir(tmpdir);
    return rc;
}
