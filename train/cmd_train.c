// cmd_train: `moet train --config FILE [--set k=v]... [--resume SPEC | --init CKPT]`, the
// command-line face of trainer_run (train/trainer.h).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/cli.h"
#include "train/comm.h"
#include "train/common.h"
#include "train/config.h"
#include "train/trainer.h"

#define MAX_SETS_ 256

static const char *TRAIN_HELP =
    "usage: moet train --config FILE [--set section.key=value]... [--resume latest|DIR|CKPT]\n"
    "                  [--init CKPT] [--stop-at N]\n"
    "\n"
    "Trains the model of FILE on [data] train with AdamW: global_batch / micro_batch\n"
    "micro-batches per step (gradients averaged), lr warmup then cosine | linear | constant to\n"
    "min_lr at max_steps, gradient clipping at grad_clip. Every log_every steps it prints a line\n"
    "and appends a JSON object to checkpoint.dir/metrics.jsonl (step, tokens, loss, ce, lb, z,\n"
    "lr, grad_norm, tok_per_s, mfu, load_max_mean); every eval_every steps (and at step 0 and\n"
    "the end) it evaluates the mean cross-entropy of eval_batches micro-batches from the start\n"
    "of [data] valid (val_loss, val_ppl). Checkpoints go to checkpoint.dir every\n"
    "checkpoint.every steps and at the end. MFU is against this machine's measured sgemm peak\n"
    "(on cpu with precision = bf16: its bf16 GEMM peak; on cuda: the GPU's dense bf16 peak).\n"
    "\n"
    "  --config FILE    the run's INI file (see `moet info --help` for the keys)\n"
    "  --set k=v        override a key, e.g. --set train.max_steps=200 (repeatable)\n"
    "  --resume SPEC    continue a run: `latest` (checkpoint.dir/latest.h5), a directory or a\n"
    "                   checkpoint file; restores weights, optimizer, step and data position,\n"
    "                   and drops the metrics lines after that step. Bit-exact on CPU.\n"
    "  --init CKPT      start a new run (step 0, fresh optimizer) from the weights of CKPT\n"
    "  --stop-at N      stop after step N with a checkpoint (exit 0) although the schedule\n"
    "                   runs to max_steps: a planned interruption; resume with --resume latest\n"
    "\n"
    "SIGTERM or SIGUSR1: the current step finishes, a checkpoint is written, exit status 0.\n"
    "A non-finite loss or gradient stops the run with status 1, naming the step and the first\n"
    "tensor, without writing a checkpoint.\n";

int cmd_train(int argc, char **argv, MoetErr *err) {
    const char *config = NULL;
    char *sets[MAX_SETS_];
    int n_sets = 0;
    TrainOpts o = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const int has_val = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(TRAIN_HELP, stdout);
            return MOET_OK;
        } else if (strcmp(a, "--config") == 0 && has_val) {
            config = argv[++i];
        } else if (strncmp(a, "--config=", 9) == 0) {
            config = a + 9;
        } else if ((strcmp(a, "--set") == 0 && has_val) || strncmp(a, "--set=", 6) == 0) {
            if (n_sets == MAX_SETS_)
                return moet_errf(err, MOET_EUSAGE, "train: too many --set options (at most %d)",
                                 MAX_SETS_);
            sets[n_sets++] = a[5] == '=' ? (char *)a + 6 : argv[++i];
        } else if (strcmp(a, "--resume") == 0 && has_val) {
            o.resume = argv[++i];
        } else if (strcmp(a, "--init") == 0 && has_val) {
            o.init = argv[++i];
        } else if (strcmp(a, "--stop-at") == 0 && has_val) {
            char *endp;
            long long v = strtoll(argv[++i], &endp, 10);
            if (*endp || v < 1)
                return moet_errf(err, MOET_EUSAGE, "train: --stop-at needs a step >= 1, not %s",
                                 argv[i]);
            o.stop_at = v;
        } else if (strcmp(a, "--config") == 0 || strcmp(a, "--set") == 0 ||
                   strcmp(a, "--resume") == 0 || strcmp(a, "--init") == 0 ||
                   strcmp(a, "--stop-at") == 0) {
            return moet_errf(err, MOET_EUSAGE, "train: %s needs a value (see moet train --help)",
                             a);
        } else {
            return moet_errf(err, MOET_EUSAGE,
                             "train: unknown argument %s (see moet train "
                             "--help)",
                             a);
        }
    }
    if (!config) return moet_errf(err, MOET_EUSAGE, "train: missing --config FILE (see --help)");
    if (o.resume && o.init)
        return moet_errf(err, MOET_EUSAGE,
                         "train: --resume and --init exclude each other "
                         "(--resume continues a run, --init starts a new one from weights)");
    Config c;
    int rc = config_from_cli(&c, config, n_sets, sets, err);
    if (rc) return rc;
    // the ranks: mpirun / srun start several; a plain start is a world of one
    Parallel par;
    if ((rc = comm_init(NULL, NULL, c.ep, &par, err))) return rc;
    rc = trainer_run(&c, &o, &par, err);
    if (rc && par.world_size > 1) {
        // the other ranks may wait in a collective: end the whole job, naming this rank
        fprintf(stderr, "moet: %s\n", err->msg);
        comm_abort_msg(&par, rc, "moet train failed on this rank (message above)");
    }
    comm_finalize(&par);
    return rc;
}
