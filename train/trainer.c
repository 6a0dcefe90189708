// trainer: the training loop (see trainer.h): data and expert parallelism over the ranks of
// Parallel, gradient buckets (gradsync), ZeRO-1 (optim), checkpoints, signals, the watchdogs.
#include "train/trainer.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/loader.h"
#include "kernels/kernels.h"
#include "train/ckpt.h"
#include "train/gradsync.h"
#include "train/memplan.h"
#include "train/model.h"
#include "train/optim.h"

// ---------------------------------------------------------------------------------------
// helpers

// The best of 9 timed n^3 products C = A B^T (a first call warms up the threads). The best,
// not the median: shared machines lose throughput to their neighbours now and then, and a
// peak is what the hardware can do.
static double best_gflops_(void (*product)(float *C, const float *A, const float *B, int n)) {
    const int n = 2048;
    float *A = moet_malloc((size_t)n * n * sizeof(float));
    float *B = moet_malloc((size_t)n * n * sizeof(float));
    float *C = moet_malloc((size_t)n * n * sizeof(float));
    for (size_t i = 0; i < (size_t)n * n; i++) {
        A[i] = (float)((i * 7) % 13) * 0.01f;
        B[i] = (float)((i * 5) % 11) * 0.01f;
    }
    double best = 0;
    for (int r = 0; r < 10; r++) {
        double t0 = moet_time();
        product(C, A, B, n);
        double dt = moet_time() - t0;
        double gf = 2.0 * n * n * (double)n / dt / 1e9;
        if (r > 0 && gf > best) best = gf;
    }
    free(A);
    free(B);
    free(C);
    return best;
}

static void sgemm_nt_(float *C, const float *A, const float *B, int n) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, A, n, B, n, 0.0f, C, n);
}

static void bf16_nt_(float *C, const float *A, const float *B, int n) {
    matmul_forward_bf16(C, A, B, n, n, n); // its operand rounding included
}

double cpu_sgemm_peak_gflops(void) {
    return best_gflops_(sgemm_nt_);
}

double cpu_bf16_peak_gflops(void) {
    return best_gflops_(bf16_nt_);
}

double cpu_peak_gflops(const Ops *ops) {
    return ops == ops_cpu_bf16() ? cpu_bf16_peak_gflops() : cpu_sgemm_peak_gflops();
}

const char *cpu_peak_kind(const Ops *ops) {
    return ops == ops_cpu_bf16() ? "bf16 GEMM" : "sgemm";
}

// The signal that asked us to stop (0: none). Set by the handler, read between steps: the
// only global state of the trainer, as a signal handler can reach nothing else.
static volatile sig_atomic_t stop_signal_ = 0;

static void on_signal_(int sig) {
    stop_signal_ = sig;
}

// The value of "step" in a metrics line, or -1. tsv (expert_load.tsv): the first column; a
// comment line (#) counts as step 0, so that it is always kept.
static long long line_step_(const char *line, int tsv) {
    if (tsv) return line[0] == '#' ? 0 : strtoll(line, NULL, 10);
    const char *s = strstr(line, "\"step\":");
    return s ? strtoll(s + 7, NULL, 10) : -1;
}

// Keeps the metrics lines of steps <= keep_upto (all gone for keep_upto < 0), so that a resumed
// run continues a consistent file: the steps after its checkpoint are logged again.
static int trim_metrics_(const char *path, long long keep_upto, int tsv, MoetErr *err) {
    FILE *in = fopen(path, "r");
    if (!in) return 0; // nothing yet
    char tmp[2200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *out = fopen(tmp, "w");
    if (!out) {
        fclose(in);
        return moet_errf(err, MOET_EFAIL, "cannot write %s: %s", tmp, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, in) > 0) {
        long long s = line_step_(line, tsv);
        if (s >= 0 && s <= keep_upto) fputs(line, out);
    }
    free(line);
    fclose(in);
    if (fclose(out) != 0 || rename(tmp, path) != 0)
        return moet_errf(err, MOET_EFAIL, "cannot rewrite %s: %s", path, strerror(errno));
    return 0;
}

static void fmt_hms_(char *buf, size_t n, double s) {
    if (!(s >= 0) || s > 1e8) s = 0;
    long long t = (long long)(s + 0.5);
    snprintf(buf, n, "%lld:%02lld:%02lld", t / 3600, t / 60 % 60, t % 60);
}

// A JSON number, or null for a value JSON cannot hold.
static void json_num_(FILE *f, const char *key, double v) {
    if (isfinite(v))
        fprintf(f, ",\"%s\":%.17g", key, v);
    else
        fprintf(f, ",\"%s\":null", key);
}

// Mean cross-entropy over the first n micro-batches of the validation set (forward only).
static int evaluate_(Model *m, Loader *vl, const LoaderPos *start, int n, int32_t *tokens,
                     double *out, MoetErr *err) {
    int rc = loader_set_pos(vl, start, 0, err);
    if (rc) return rc;
    double s = 0;
    for (int i = 0; i < n; i++) {
        if ((rc = loader_next(vl, tokens, err))) return rc;
        model_forward(m, tokens);
        s += m->ce;
    }
    *out = s / n;
    return 0;
}

typedef struct {
    const Config *c;
    Model *m;
    Optim *opt;
    Loader *train;
    const char *ini; // the config's INI text, stored in every checkpoint
    Parallel *par;
} SaveCtx;

static int save_(const SaveCtx *s, int64_t step, int64_t tokens_seen, double lr, char *path,
                 size_t path_size, MoetErr *err) {
    TrainState st = {0};
    st.step = step;
    st.tokens_seen = tokens_seen;
    st.optim_step = s->opt->t;
    loader_get_pos(s->train, &st.data);
    st.rng_state = 0;
    st.lr = lr;
    CkptSaveOpts so = {s->c->ckpt_dir, s->c->keep_last, s->c->keep_every, s->c->model_only};
    const int mo = s->c->model_only;
    // the file is written from host memory (no-ops on the CPU backend)
    model_download_params(s->m);
    float *ea = s->opt->exp_avg_h, *eas = s->opt->exp_avg_sq_h;
    if (!mo && s->opt->sharded) {
        // ZeRO-1: the file holds the full moments, gathered from the ranks' parts
        ea = moet_malloc(s->m->n_params * sizeof(float));
        eas = moet_malloc(s->m->n_params * sizeof(float));
        int rc = optim_gather_host(s->opt, s->m, ea, eas, err);
        if (rc) {
            free(ea);
            free(eas);
            return rc;
        }
    } else if (!mo) {
        optim_download(s->opt);
    }
    int rc = ckpt_save_par(&so, s->m, mo ? NULL : ea, mo ? NULL : eas, &st, s->ini, s->par, path,
                           path_size, err);
    if (s->opt->sharded && !mo) {
        free(ea);
        free(eas);
    }
    return rc;
}

// A test hook: MOET_DEBUG_STALL="R:S" makes rank R stop responding at the start of step S (as
// a hung process would), "R:S:backward" between its forward and backward of step S (inside the
// watched phase, outside any collective), to test that the watchdogs end the job.
static void debug_stall_(int rank, int64_t step, const char *where) {
    const char *s = getenv("MOET_DEBUG_STALL");
    int r;
    long long at;
    char w[16] = "start";
    if (!s || sscanf(s, "%d:%lld:%15s", &r, &at, w) < 2 || r != rank || at != step ||
        strcmp(w, where) != 0)
        return;
    fprintf(stderr, "rank %d: MOET_DEBUG_STALL: stalling at step %lld (%s)\n", rank, at, where);
    for (;;) pause();
}

// Expert-load telemetry of one logged step from load (L,E), the step's assignments per expert
// over the global batch: per layer max/mean (busiest expert / mean; 1 is perfect balance, E/K
// the worst possible) and top_frac, the fraction of the step's tokens routed to the layer's
// busiest expert (each token counts once per expert: K/E balanced, 1 when every token goes
// there). *worst = the largest max/mean over the layers.
static void load_stats_(const int64_t *load, int L, int E, int K, double *max_mean,
                        double *top_frac, double *worst) {
    *worst = 0;
    for (int l = 0; l < L; l++) {
        int64_t mx = 0, sum = 0;
        for (int e = 0; e < E; e++) {
            int64_t v = load[(size_t)l * E + e];
            sum += v;
            if (v > mx) mx = v;
        }
        max_mean[l] = sum > 0 ? (double)mx * E / (double)sum : 0;
        top_frac[l] = sum > 0 ? (double)mx * K / (double)sum : 0;
        if (max_mean[l] > *worst) *worst = max_mean[l];
    }
}

static void json_array_(FILE *f, const char *key, const double *v, int n) {
    fprintf(f, ",\"%s\":[", key);
    for (int i = 0; i < n; i++) fprintf(f, "%s%.6g", i ? "," : "", v[i]);
    fprintf(f, "]");
}

// ---------------------------------------------------------------------------------------
// the loop

int trainer_run(const Config *c, const TrainOpts *o, Parallel *par, MoetErr *err) {
    if (o->resume && o->init)
        return moet_errf(err, MOET_EUSAGE,
                         "train: --resume and --init exclude each other "
                         "(--resume continues a run, --init starts a new one from weights)");
    const int world = par->world_size, rank = par->rank;
    const int ep = par->ep_size;
    if (c->global_batch % (c->micro_batch * world) != 0)
        return moet_errf(err, MOET_EUSAGE,
                         "train: [train] global_batch = %d is not a multiple of micro_batch %d "
                         "x %d ranks", c->global_batch, c->micro_batch, world);
    const int accum = c->global_batch / (c->micro_batch * world);
    const int lead = rank == 0;  // prints, metrics, checkpoints
    if (!lead && !freopen("/dev/null", "w", stdout))  // one log for the job; errors: stderr
        return moet_errf(err, MOET_EFAIL, "rank %d: cannot silence stdout", rank);
    const int B = c->micro_batch, T = c->seq_len;
    const int eval_on = c->eval_every > 0 && c->valid[0] && c->eval_batches > 0;

    Model m;
    memset(&m, 0, sizeof m);
    Optim opt;
    memset(&opt, 0, sizeof opt);
    Loader *tl = NULL, *vl = NULL;
    FILE *mf = NULL, *lf = NULL; // metrics.jsonl, expert_load.tsv
    int32_t *tokens = NULL, *mb_tokens = NULL;
    float *gacc = NULL;  // the gradient sum over this step's micro-batches (accum > 1)
    int64_t *load = NULL, *gcounts = NULL, *pre_load = NULL;
    double *lstat = NULL;
    char *ini = NULL;
    int rc = 0, have_model = 0, sig_installed = 0;
    struct sigaction old_term, old_usr1;
    char path[1100], mpath[2100], lpath[2100], binfo[512];
    GradSync *gs = NULL; // the gradient sum over the ranks (world > 1)

    int ini_len = config_to_ini(c, NULL, 0);
    ini = moet_malloc((size_t)ini_len + 1);
    config_to_ini(c, ini, ini_len + 1);

    const Ops *ops;
    if ((rc = model_open_backend(c, model_local_rank(), &ops, binfo, sizeof binfo, err)))
        goto done;
    // gradients and expert rows move between the backend's buffers (GPU memory on a GPU)
    if ((rc = comm_use_backend(par, ops, c->comm, c->timeout_s, err))) goto done;
    if ((rc = model_create_ops(&m, c, ops, ep > 1 ? par->ep_rank : 0, ep, err))) goto done;
    have_model = 1;
    if (ep > 1 && (rc = model_set_comm(&m, par->ep, err))) goto done;
    if ((rc = model_set_batch(&m, B, T, err))) goto done;
    if (c->zero && world > 1) optim_create_sharded(&opt, &m, par);
    else optim_create(&opt, &m);
    if (world > 1 &&
        (rc = gradsync_create(&gs, &m, par, (size_t)c->bucket_mb << 20, err)))
        goto done;

    // data
    LoaderConfig lc = {.glob = c->train,
                       .seq_len = T,
                       .vocab_size = c->vocab_size,
                       .seed = c->seed,
                       .shuffle = 1,
                       .micro_batch = B,
                       .global_batch = c->global_batch,
                       .rank = rank,
                       .world = world,
                       .prefetch = 2};
    if ((rc = loader_open(&tl, &lc, err))) goto done;
    LoaderPos vstart = {0};
    if (eval_on) {
        // validation: file order from its start, one micro-batch per "global batch"
        LoaderConfig vc = lc;
        vc.glob = c->valid;
        vc.shuffle = 0;
        // every rank evaluates the same eval_batches micro-batches: val_loss does not depend
        // on the world size (the work is repeated; evaluation is small)
        vc.global_batch = B;
        vc.rank = 0;
        vc.world = 1;
        vc.prefetch = 0;
        if ((rc = loader_open(&vl, &vc, err))) goto done;
        loader_get_pos(vl, &vstart);
    }

    // weights, optimizer and position
    int64_t step = 0, tokens_seen = 0;
    if (o->resume) {
        if ((rc = ckpt_resolve(o->resume, c->ckpt_dir, path, sizeof path, err))) goto done;
        TrainState st;
        if (opt.sharded) { // the file's full moments, of which this rank keeps its parts
            float *ea = moet_malloc(m.n_params * sizeof(float));
            float *eas = moet_malloc(m.n_params * sizeof(float));
            rc = ckpt_load(path, &m, ea, eas, &st, err);
            if (!rc) optim_scatter_host(&opt, ea, eas);
            free(ea);
            free(eas);
            if (rc) goto done;
        } else {
            if ((rc = ckpt_load(path, &m, opt.exp_avg_h, opt.exp_avg_sq_h, &st, err))) goto done;
            optim_upload(&opt);
        }
        if ((rc = loader_set_pos(tl, &st.data, 0, err))) goto done;
        step = st.step;
        tokens_seen = st.tokens_seen;
        opt.t = st.optim_step;
        printf("resumed from %s: step %lld, %lld tokens seen\n", path, (long long)step,
               (long long)tokens_seen);
    } else if (o->init) {
        if ((rc = ckpt_resolve(o->init, c->ckpt_dir, path, sizeof path, err))) goto done;
        if ((rc = ckpt_load_model(path, &m, err))) goto done;
        printf("initialised from the weights of %s (step 0, fresh optimizer)\n", path);
    } else {
        model_init_weights(&m, c->seed);
    }
    const int64_t end = o->stop_at > 0 && o->stop_at < c->max_steps ? o->stop_at : c->max_steps;
    if (step >= end) {
        printf("step %lld >= %lld: nothing to train\n", (long long)step, (long long)end);
        goto done;
    }

    // metrics.jsonl: a fresh run starts it anew, a resumed one drops the steps after its
    // checkpoint
    if (lead) {
        if ((rc = moet_mkdirs(c->ckpt_dir, err))) goto done;
        snprintf(mpath, sizeof mpath, "%s/%s", c->ckpt_dir, c->metrics);
        if ((rc = trim_metrics_(mpath, o->resume ? (long long)step : -1, 0, err))) goto done;
        snprintf(lpath, sizeof lpath, "%s/expert_load.tsv", c->ckpt_dir);
        if (m.E > 0 && (rc = trim_metrics_(lpath, o->resume ? (long long)step : -1, 1, err)))
            goto done;
    } else {
        snprintf(mpath, sizeof mpath, "/dev/null");
        snprintf(lpath, sizeof lpath, "/dev/null");
    }
    if (!(mf = fopen(mpath, "a"))) {
        rc = moet_errf(err, MOET_EFAIL, "cannot open %s: %s", mpath, strerror(errno));
        goto done;
    }
    // expert_load.tsv: per logged step and layer, the assignments of every expert (the heat map
    // of launch/plot-metrics.sh)
    if (m.E > 0) {
        if (!(lf = fopen(lpath, "a"))) {
            rc = moet_errf(err, MOET_EFAIL, "cannot open %s: %s", lpath, strerror(errno));
            goto done;
        }
        if (ftell(lf) == 0)
            fprintf(lf,
                    "# step\tlayer\tassignments of experts 0..%d in the step's global batch "
                    "(tokens x top_k in all)\n",
                    m.E - 1);
    }

    tokens = moet_malloc((size_t)B * T * sizeof(int32_t));
    if (accum > 1) gacc = ops->alloc(m.n_params * sizeof(float));
    const int LE = m.E > 0 ? m.L * m.E : 0;
    if (LE) load = moet_calloc((size_t)LE * sizeof(int64_t));
    if (LE) lstat = moet_calloc((size_t)2 * m.L * sizeof(double));
    // lb_scope = global_batch (more than one micro-batch in the global batch): f_e of every
    // micro-batch's lb loss counts the whole global batch. Accumulation 1: each MoE layer sums
    // its counts over the world inside forward (one all-reduce of E numbers per layer). More
    // micro-batches per rank: a routing pre-pass (the layers' forward, no LM head) over the
    // step's micro-batches gives the counts first, then the training passes run on the same
    // tokens. Integer counts: both give the same f bit for bit.
    const int lb_global = LE && strcmp(c->lb_scope, "global_batch") == 0 && accum * world > 1;
    const int lb_prepass = lb_global && accum > 1;
    if (lb_prepass) {
        mb_tokens = moet_malloc((size_t)accum * B * T * sizeof(int32_t));
        gcounts = moet_calloc((size_t)LE * sizeof(int64_t));
        pre_load = moet_calloc((size_t)LE * sizeof(int64_t));
    }
    const int bias_on = LE && c->bias_update_rate > 0;
    // the job's peak: each rank measures its own cores; MFU compares the job's tokens/s with
    // their sum
    const int gpu = strcmp(ops->name, "cuda") == 0;
    double peak = gpu ? model_peak_gflops(ops) : cpu_peak_gflops(ops);
    if (world > 1 && (rc = comm_allreduce_sum_f64(par->world, &peak, 1, err))) goto done;
    const double flops_tok = model_flops_per_token(c);
    const int64_t tok_step = (int64_t)c->global_batch * T;
    printf("moet train: %zu parameters, %d x %d tokens per micro-batch, %d micro-batches per "
           "step (%lld tokens), steps %lld..%lld of %d; %s; %s peak %.1f GFLOP/s\n",
           m.n_params, B, T, accum, (long long)tok_step, (long long)step + 1, (long long)end,
           c->max_steps, binfo, gpu ? "bf16" : cpu_peak_kind(ops), peak);
    if (LE && (lb_global || bias_on || m.score_fn == ROUTER_SIGMOID))
        printf("balancing: %s router, lb_coef %g over the %s%s%s\n", c->router, (double)c->lb_coef,
               lb_global ? "global batch" : "micro-batch",
               lb_prepass  ? " (a routing pre-pass per micro-batch)"
               : lb_global ? " (expert counts summed over the ranks in each layer)"
                           : "",
               bias_on ? ", aux-loss-free expert bias" : "");
    if (world > 1) {
        int nb;
        size_t mx;
        gradsync_plan(gs, &nb, &mx);
        printf("data parallel: %d ranks, ep %d; gradients over %s in %d buckets (largest %.1f "
               "MB)%s%s\n", world, ep, comm_buf_transport(par->world), nb, mx * 4.0 / 1e6,
               ep > 1 ? ", expert rows over " : "", ep > 1 ? comm_buf_transport(par->ep) : "");
        if (opt.sharded)
            printf("ZeRO-1: this rank keeps the AdamW moments of %zu of %zu parameters\n", opt.n,
                   m.n_params);
    }
    fflush(stdout);

    SaveCtx sc = {c, &m, &opt, tl, ini, par};
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal_;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART; // a signal during a checkpoint write must not fail the write
    stop_signal_ = 0;
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGUSR1, &sa, &old_usr1);
    sig_installed = 1;

    if (eval_on && step == 0) {
        double vl_loss;
        if ((rc = evaluate_(&m, vl, &vstart, c->eval_batches, tokens, &vl_loss, err))) goto done;
        printf("eval step 0 | val_loss %.4f | val_ppl %.2f\n", vl_loss, exp(vl_loss));
        fprintf(mf, "{\"step\":0");
        json_num_(mf, "val_loss", vl_loss);
        json_num_(mf, "val_ppl", exp(vl_loss));
        fprintf(mf, "}\n");
        fflush(mf);
    }

    const int width = snprintf(NULL, 0, "%d", c->max_steps);
    const int64_t first = step;
    const double t_start = moet_time();
    double lr = 0;
    while (step < end) {
        step++;
        debug_stall_(rank, step, "start");
        double t0 = moet_time();
        comm_stats_reset();
        model_zero_grad(&m);
        if (LE) memset(load, 0, (size_t)LE * sizeof(int64_t));
        double loss = 0, ce = 0, lb = 0, z = 0;
        if (lb_prepass) {
            // the routing pre-pass: this rank's micro-batches, kept for the training passes
            memset(pre_load, 0, (size_t)LE * sizeof(int64_t));
            for (int a = 0; a < accum; a++) {
                int32_t *mt = mb_tokens + (size_t)a * B * T;
                if ((rc = loader_next(tl, mt, err))) goto done;
                if (world > 1)
                    comm_watch_phase_begin(par->world, "routing pre-pass of a micro-batch");
                model_forward_route(&m, mt);
                if (world > 1) comm_watch_phase_end();
                for (int i = 0; i < LE; i++) pre_load[i] += m.expert_tokens[i];
            }
            if (world > 1) {
                double *dl = moet_malloc((size_t)LE * sizeof(double));
                for (int i = 0; i < LE; i++) dl[i] = (double)pre_load[i];
                rc = comm_allreduce_sum_f64(par->world, dl, (size_t)LE, err);
                for (int i = 0; i < LE; i++) gcounts[i] = (int64_t)dl[i];
                free(dl);
                if (rc) goto done;
            } else {
                memcpy(gcounts, pre_load, (size_t)LE * sizeof(int64_t));
            }
            m.lb_global_counts = gcounts;
        } else if (lb_global) {
            m.lb_global_comm = par->world;
        }
        for (int a = 0; a < accum; a++) {
            // the pre-pass's tokens, or the next micro-batch
            int32_t *mt = lb_prepass ? mb_tokens + (size_t)a * B * T : tokens;
            if (!lb_prepass && (rc = loader_next(tl, tokens, err))) goto done;
            if (world > 1)
                comm_watch_phase_begin(par->world, "forward + backward of a micro-batch");
            // each micro-batch's gradient apart (the LM head's is made during forward)
            if (accum > 1) model_zero_grad(&m);
            model_forward_train(&m, mt);
            debug_stall_(rank, step, "backward");
            // the last micro-batch's backward starts the all-reduce of each finished bucket
            const int sync = gs && a == accum - 1;
            if (sync) gradsync_arm(gs, accum > 1 ? gacc : m.grads);
            model_backward(&m);
            if (sync && (rc = gradsync_finish(gs, err))) goto done;
            if (world > 1) comm_watch_phase_end();
            // Sum the micro-batch gradients one whole micro-batch at a time, g0 + g1 + ...,
            // the order the rank-order all-reduce uses: world W with accumulation 1 then gives
            // the bits of world 1 with accumulation W. (Backward accumulating straight into
            // one buffer would interleave the sums inside sgemm and differ in the last bits.)
            if (accum > 1 && !sync) {
                if (a == 0) ops->copy(gacc, m.grads, m.n_params * sizeof(float));
                else ops->add_forward(gacc, gacc, m.grads, m.n_params);
            }
            loss += m.loss;
            ce += m.ce;
            lb += m.lb;
            z += m.z;
            for (int i = 0; i < LE; i++) load[i] += m.expert_tokens[i];
        }
        m.lb_global_counts = NULL;
        m.lb_global_comm = NULL;
        // the training passes routed as the pre-pass did (the same ops on the same tokens and
        // weights): else f did not count the loads the step really had
        if (lb_prepass && memcmp(pre_load, load, (size_t)LE * sizeof(int64_t)) != 0) {
            rc = moet_errf(err, MOET_EFAIL,
                           "step %lld: lb_scope = global_batch: the routing pre-pass and the "
                           "training forward chose different experts (a non-deterministic "
                           "backend?); no checkpoint written\n---> HINT: report it; "
                           "lb_scope = micro_batch avoids the pre-pass",
                           (long long)step);
            goto done;
        }
        if (world > 1) {
            // data parallel: the gradients were summed over the ranks by gradsync (rank order:
            // bit-identical to one rank accumulating the same micro-batches; expert tensors
            // over the expert-DP group); now the losses and expert loads
            double sums[4] = {loss, ce, lb, z};
            if ((rc = comm_allreduce_sum_f64(par->world, sums, 4, err))) goto done;
            loss = sums[0], ce = sums[1], lb = sums[2], z = sums[3];
            if (LE) {
                double *dl = moet_malloc((size_t)LE * sizeof(double));
                for (int i = 0; i < LE; i++) dl[i] = (double)load[i];
                rc = comm_allreduce_sum_f64(par->world, dl, (size_t)LE, err);
                for (int i = 0; i < LE; i++) load[i] = (int64_t)dl[i];
                free(dl);
                if (rc) goto done;
            }
        }
        if (accum > 1) ops->copy(m.grads, gacc, m.n_params * sizeof(float));
        const int n_micro = accum * world;
        if (n_micro > 1) ops->scale_inplace(m.grads, 1.0f / (float)n_micro, m.n_params);
        loss /= n_micro;
        ce /= n_micro;
        lb /= n_micro;
        z /= n_micro;

        const ParamTensor *bad = NULL;
        double gnorm;
        if (ep == 1) gnorm = optim_grad_norm(&m, &bad);
        else if ((rc = optim_grad_norm_ep(&m, par->ep, &gnorm, &bad, err))) goto done;
        int nonfinite = bad || !isfinite(loss) || !isfinite(gnorm);
        if (world > 1) { // every rank must stop together (the loss is the same everywhere)
            double f = nonfinite;
            if ((rc = comm_allreduce_max_f64(par->world, &f, 1, err))) goto done;
            nonfinite = f != 0.0;
        }
        if (nonfinite) {
            if (!bad && isfinite(loss))
                rc = moet_errf(err, MOET_EFAIL,
                               "step %lld: non-finite gradient on another rank (loss %g); no "
                               "checkpoint written, the last one is untouched\n"
                               "---> HINT: lower optim.lr or set optim.grad_clip, then resume "
                               "from the last checkpoint",
                               (long long)step, loss);
            else if (bad)
                rc = moet_errf(err, MOET_EFAIL,
                               "step %lld: non-finite gradient in tensor %s "
                               "(loss %g); no checkpoint written, the last one is untouched\n"
                               "---> HINT: lower optim.lr or set optim.grad_clip, then resume "
                               "from the last checkpoint",
                               (long long)step, bad->name, loss);
            else
                rc = moet_errf(err, MOET_EFAIL,
                               "step %lld: non-finite loss %g; no checkpoint "
                               "written, the last one is untouched\n---> HINT: lower optim.lr",
                               (long long)step, loss);
            goto done;
        }
        lr = optim_lr(c, step);
        optim_step(&opt, &m, c, (float)lr, optim_clip_scale(gnorm, c->grad_clip));
        if (opt.sharded && (rc = optim_gather_params(&opt, &m, err))) goto done;
        // aux-loss-free balancing: the biases follow the step's global loads (identical on
        // every rank, so every rank computes the same biases)
        if (bias_on) model_update_expert_bias(&m, load, c->bias_update_rate);
        tokens_seen += tok_step;
        ops->sync(); // GPU ops are asynchronous: the step ends when the update has run
        const double dt = moet_time() - t0;

        if (step % c->log_every == 0 || step == end) {
            double tok_s = (double)tok_step / dt;
            double mfu = flops_tok * tok_s / (peak * 1e9);
            double lmm = 0;
            if (LE) load_stats_(load, m.L, m.E, m.K, lstat, lstat + m.L, &lmm);
            char eta[32], lbuf[48] = "";
            fmt_hms_(eta, sizeof eta,
                     (moet_time() - t_start) / (double)(step - first) * (double)(end - step));
            if (LE) snprintf(lbuf, sizeof lbuf, " | load max/mean %.2f", lmm);
            // communication of this step on this rank: bytes sent and time inside collectives
            CommStats cs;
            comm_stats(&cs);
            char cbuf[192] = "";
            if (world > 1)
                snprintf(cbuf, sizeof cbuf,
                         " | comm a2a %.1f MB %.0f ms, allreduce %.1f MB %.0f ms",
                         cs.alltoall_bytes / 1e6, cs.alltoall_s * 1e3, cs.allreduce_bytes / 1e6,
                         cs.allreduce_s * 1e3);
            if (world > 1 && cs.allgather_bytes > 0) {
                size_t l = strlen(cbuf);
                snprintf(cbuf + l, sizeof cbuf - l, ", allgather %.1f MB %.0f ms",
                         cs.allgather_bytes / 1e6, cs.allgather_s * 1e3);
            }
            printf("step %*lld/%d | loss %.4f ce %.4f lb %.4f z %.3f | lr %.1e | gnorm %.3f | "
                   "%.0f tok/s | MFU %.1f%%%s%s | ETA %s\n",
                   width, (long long)step, c->max_steps, loss, ce, lb, z, lr, gnorm, tok_s,
                   100 * mfu, lbuf, cbuf, eta);

            fflush(stdout);
            fprintf(mf, "{\"step\":%lld,\"tokens\":%lld", (long long)step, (long long)tokens_seen);
            json_num_(mf, "loss", loss);
            json_num_(mf, "ce", ce);
            json_num_(mf, "lb", lb);
            json_num_(mf, "z", z);
            json_num_(mf, "lr", lr);
            json_num_(mf, "grad_norm", gnorm);
            json_num_(mf, "tok_per_s", tok_s);
            json_num_(mf, "mfu", mfu);
            if (world > 1) {
                json_num_(mf, "alltoall_bytes", cs.alltoall_bytes);
                json_num_(mf, "alltoall_s", cs.alltoall_s);
                json_num_(mf, "allreduce_bytes", cs.allreduce_bytes);
                json_num_(mf, "allreduce_s", cs.allreduce_s);
                if (cs.allgather_bytes > 0) {
                    json_num_(mf, "allgather_bytes", cs.allgather_bytes);
                    json_num_(mf, "allgather_s", cs.allgather_s);
                }
            }
            if (LE) {
                json_num_(mf, "load_max_mean", lmm);
                json_array_(mf, "layer_load_max_mean", lstat, m.L);
                json_array_(mf, "layer_top_frac", lstat + m.L, m.L);
            }
            fprintf(mf, "}\n");
            fflush(mf);
            for (int l = 0; lf && l < m.L; l++) {
                fprintf(lf, "%lld\t%d", (long long)step, l);
                for (int e = 0; e < m.E; e++)
                    fprintf(lf, "\t%lld", (long long)load[(size_t)l * m.E + e]);
                fprintf(lf, "\n");
            }
            if (lf) fflush(lf);
        }

        if (step == first + 1 && ops->on_device) { // the memory a step takes, vs moet info
            size_t in_use, mem_peak;
            ops->mem_stats(&in_use, &mem_peak);
            MemPlan plan;
            memplan_predict(c, world, &plan);
            char mline[160];
            memplan_format_peak(mline, sizeof mline, (double)mem_peak, &plan);
            printf("%s\n", mline);
            fflush(stdout);
        }

        if (eval_on && (step % c->eval_every == 0 || step == end)) {
            double vl_loss;
            if ((rc = evaluate_(&m, vl, &vstart, c->eval_batches, tokens, &vl_loss, err)))
                goto done;
            printf("eval step %lld | val_loss %.4f | val_ppl %.2f\n", (long long)step, vl_loss,
                   exp(vl_loss));
            fflush(stdout);
            fprintf(mf, "{\"step\":%lld", (long long)step);
            json_num_(mf, "val_loss", vl_loss);
            json_num_(mf, "val_ppl", exp(vl_loss));
            fprintf(mf, "}\n");
            fflush(mf);
        }

        int stopping = stop_signal_ != 0;
        if (world > 1) {  // a signal may reach the ranks at different steps: agree on it
            double flag = stopping ? (double)stop_signal_ : 0.0;
            if ((rc = comm_allreduce_max_f64(par->world, &flag, 1, err))) goto done;
            stopping = flag != 0.0;
            if (stopping && !stop_signal_) stop_signal_ = (sig_atomic_t)flag;
        }
        if (stopping || step == end || (c->ckpt_every > 0 && step % c->ckpt_every == 0)) {
            // every rank calls: ep = 1, rank 0 writes (every rank holds the same weights);
            // ep > 1, a collective parallel-HDF5 write (ckpt_save_par); all learn the outcome
            const double t_save = moet_time();
            int saved = save_(&sc, step, tokens_seen, lr, path, sizeof path, err);
            const double dt_save = moet_time() - t_save;
            if (world > 1) {
                double f = saved;
                if ((rc = comm_allreduce_max_f64(par->world, &f, 1, err))) goto done;
                if (f != 0.0 && !saved)
                    moet_errf(err, MOET_EFAIL, "rank 0 could not write the checkpoint");
                saved = f != 0.0;
            }
            if (saved) {
                char why[sizeof err->msg];
                memcpy(why, err->msg, sizeof why);
                rc = moet_errf(err, MOET_EFAIL, "step %lld: checkpoint failed, stopping: %.1900s",
                               (long long)step, why);
                goto done;
            }
            struct stat sb;
            if (par->rank == 0 && stat(path, &sb) == 0 && dt_save > 0)
                printf("checkpoint %s (%.2f GB in %.2f s: %.2f GB/s, fsync'ed)\n", path,
                       sb.st_size / 1e9, dt_save, sb.st_size / 1e9 / dt_save);
            else
                printf("checkpoint %s\n", path);
            fflush(stdout);
        }
        if (stopping) {
            printf("received %s: stopped after step %lld, checkpoint %s\n"
                   "resume with: moet train --config ... --resume latest\n",
                   stop_signal_ == SIGTERM ? "SIGTERM" : "SIGUSR1", (long long)step, path);
            break;
        }
    }
    if (step == end)
        printf("done: %lld steps, %lld tokens, %.1f s\n", (long long)(step - first),
               (long long)tokens_seen, moet_time() - t_start);

done:
    if (sig_installed) {
        sigaction(SIGTERM, &old_term, NULL);
        sigaction(SIGUSR1, &old_usr1, NULL);
    }
    fflush(stdout);
    if (mf) fclose(mf);
    if (lf) fclose(lf);
    if (vl) loader_close(vl);
    if (tl) loader_close(tl);
    free(tokens);
    if (gacc) m.ops->free(gacc);
    gradsync_free(gs);
    free(load);
    free(lstat);
    free(mb_tokens);
    free(gcounts);
    free(pre_load);
    free(ini);
    optim_free(&opt);
    if (have_model) model_free(&m);
    return rc;
}
