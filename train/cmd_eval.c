// cmd_eval: `moet eval CKPT --data GLOB [--batches N] [--json] [--set k=v]...`: the loss and
// perplexity of a checkpoint's model on a data set, read with the training loader in file
// order, micro-batches of the checkpoint's micro_batch x seq_len (as the trainer's evaluation).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/loader.h"
#include "train/ckpt.h"
#include "train/cli.h"
#include "train/config.h"
#include "train/model.h"

#define MAX_SETS_ 64

static const char *EVAL_HELP =
    "usage: moet eval CKPT --data GLOB [--batches N] [--json] [--save-logits FILE]\n"
    "                 [--set section.key=value]...\n"
    "\n"
    "The mean cross-entropy (loss, nats per token) and perplexity of the model in CKPT (a file,\n"
    "a run folder or its latest.h5) on the token shards GLOB (*.npy from `moet tokenize`), read\n"
    "in file order in micro-batches of the checkpoint's micro_batch x seq_len: the same\n"
    "numbers as the trainer's val_loss for the same data and batch count.\n"
    "\n"
    "  --data GLOB    token shards (comma-separated globs allowed)\n"
    "  --batches N    micro-batches to evaluate (default: the whole data set, once)\n"
    "  --json         one JSON object instead of the text line\n"
    "  --save-logits FILE  the logits of the first micro-batch, float32 (micro_batch, seq_len,\n"
    "                 padded vocab) in NumPy .npy format (np.load reads it)\n"
    "  --set k=v      override a key of the checkpoint's config, e.g. --set train.device=cpu or\n"
    "                 --set train.micro_batch=1 (repeatable)\n";

// Writes m's logits (B,T,V) as a NumPy .npy file (format 1.0: magic, header length, a Python
// dict literal padded to a multiple of 64 bytes, then the raw little-endian float32 data).
static int save_logits_(const char *path, const Model *m, MoetErr *err) {
    const size_t n = (size_t)m->B * m->T * m->V;
    float *h = moet_malloc(n * sizeof(float));
    m->ops->to_host(h, m->logits, n * sizeof(float));
    char dict[128];
    int len = snprintf(dict, sizeof dict,
                       "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d, %d), }", m->B,
                       m->T, m->V);
    const int total = (10 + len + 1 + 63) / 64 * 64;  // magic 6 + version 2 + length 2
    char head[192];
    memcpy(head, "\x93NUMPY\x01\x00", 8);
    head[8] = (char)((total - 10) & 0xff);
    head[9] = (char)((total - 10) >> 8);
    memcpy(head + 10, dict, (size_t)len);
    memset(head + 10 + len, ' ', (size_t)(total - 10 - len - 1));
    head[total - 1] = '\n';
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(head, 1, (size_t)total, f) == (size_t)total &&
             fwrite(h, sizeof(float), n, f) == n;
    if (f && fclose(f) != 0) ok = 0;
    free(h);
    if (!ok) return moet_errf(err, MOET_EFAIL, "eval: cannot write the logits to %s", path);
    return MOET_OK;
}

int cmd_eval(int argc, char **argv, MoetErr *err) {
    const char *spec = NULL, *data = NULL, *save_logits = NULL;
    char *sets[MAX_SETS_];
    int n_sets = 0, json = 0;
    long long batches = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const int has_val = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(EVAL_HELP, stdout);
            return MOET_OK;
        } else if (strcmp(a, "--data") == 0 && has_val) {
            data = argv[++i];
        } else if (strcmp(a, "--batches") == 0 && has_val) {
            char *endp;
            batches = strtoll(argv[++i], &endp, 10);
            if (*endp || batches < 1)
                return moet_errf(err, MOET_EUSAGE, "eval: --batches needs a count >= 1, not %s",
                                 argv[i]);
        } else if (strcmp(a, "--save-logits") == 0 && has_val) {
            save_logits = argv[++i];
        } else if (strcmp(a, "--json") == 0) {
            json = 1;
        } else if (strcmp(a, "--set") == 0 && has_val) {
            if (n_sets == MAX_SETS_)
                return moet_errf(err, MOET_EUSAGE, "eval: too many --set options");
            sets[n_sets++] = argv[++i];
        } else if (strcmp(a, "--data") == 0 || strcmp(a, "--batches") == 0 ||
                   strcmp(a, "--set") == 0 || strcmp(a, "--save-logits") == 0) {
            return moet_errf(err, MOET_EUSAGE, "eval: %s needs a value (see moet eval --help)", a);
        } else if (a[0] == '-') {
            return moet_errf(err, MOET_EUSAGE, "eval: unknown option %s (see moet eval --help)", a);
        } else if (!spec) {
            spec = a;
        } else {
            return moet_errf(err, MOET_EUSAGE, "eval: one CKPT only (got %s and %s)", spec, a);
        }
    }
    if (!spec) return moet_errf(err, MOET_EUSAGE, "eval: missing CKPT (see moet eval --help)");
    if (!data)
        return moet_errf(err, MOET_EUSAGE,
                         "eval: missing --data GLOB (the token shards to evaluate on)");

    // the checkpoint's configuration, with the overrides; one rank holds every expert
    char path[1100];
    int rc = ckpt_resolve(spec, ".", path, sizeof path, err);
    if (rc) return rc;
    Config c;
    if ((rc = ckpt_load_config(path, n_sets, sets, &c, err))) return rc;

    Model m;
    memset(&m, 0, sizeof m);
    Loader *L = NULL;
    int32_t *tokens = NULL;
    const Ops *ops;
    char binfo[512];
    int have_model = 0;
    if ((rc = model_open_backend(&c, model_local_rank(), &ops, binfo, sizeof binfo, err)))
        return rc;
    if ((rc = model_create_inference(&m, &c, ops, err))) goto done;
    have_model = 1;
    m.keep_logits = save_logits != NULL;  // else the LM head runs in chunks
    if ((rc = model_set_batch(&m, c.micro_batch, c.seq_len, err))) goto done;
    if ((rc = ckpt_load_model(path, &m, err))) goto done;
    LoaderConfig lc = {.glob = data,
                       .seq_len = c.seq_len,
                       .vocab_size = c.vocab_size,
                       .seed = c.seed,
                       .shuffle = 0,
                       .micro_batch = c.micro_batch,
                       .global_batch = c.micro_batch,
                       .rank = 0,
                       .world = 1,
                       .prefetch = 0};
    if ((rc = loader_open(&L, &lc, err))) goto done;
    const uint64_t per_epoch = loader_batches_per_epoch(L);
    if (batches == 0) batches = (long long)per_epoch;
    if ((uint64_t)batches > per_epoch)
        fprintf(stderr,
                "moet eval: note: %lld micro-batches > the %llu the data holds: it is "
                "read again from the start\n",
                batches, (unsigned long long)per_epoch);
    tokens = moet_malloc((size_t)c.micro_batch * c.seq_len * sizeof(int32_t));
    double sum = 0, t0 = moet_time();
    for (long long b = 0; b < batches; b++) {
        if ((rc = loader_next(L, tokens, err))) goto done;
        model_forward(&m, tokens);
        sum += m.ce;
        if (b == 0 && save_logits && (rc = save_logits_(save_logits, &m, err))) goto done;
    }
    const double loss = sum / (double)batches, dt = moet_time() - t0;
    const double ntok = (double)batches * c.micro_batch * c.seq_len;
    if (json) {
        printf("{\"checkpoint\":\"%s\",\"data\":\"%s\",\"batches\":%lld,\"tokens\":%.0f,"
               "\"loss\":%.17g,\"ppl\":%.17g}\n",
               path, data, batches, ntok, loss, exp(loss));
    } else {
        printf("eval %s on %s: %lld micro-batches x %d x %d tokens (%s) | loss %.4f | ppl %.2f | "
               "%.0f tok/s\n",
               path, data, batches, c.micro_batch, c.seq_len, ops->name, loss, exp(loss),
               ntok / (dt > 0 ? dt : 1e-9));
    }
done:
    free(tokens);
    if (L) loader_close(L);
    if (have_model) model_free(&m);
    return rc;
}
