// cmd_upcycle: `moet upcycle --dense CKPT --config MOE.ini --out DIR [--granularity G]
// [--router-std S] [--seed N] [--set k=v]...`: a dense checkpoint -> a model-only step-0 MoE
// checkpoint (train/upcycle.h) that `moet train --init DIR` trains from.
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "train/ckpt.h"
#include "train/cli.h"
#include "train/config.h"
#include "train/model.h"
#include "train/upcycle.h"

#define MAX_SETS_ 64

static const char *UPCYCLE_HELP =
    "usage: moet upcycle --dense CKPT --config MOE.ini --out DIR [--granularity G]\n"
    "                    [--router-std S] [--seed N] [--set section.key=value]...\n"
    "\n"
    "Turns the dense model in CKPT (a file, a run folder or its latest.h5) into the MoE model of\n"
    "MOE.ini, written as a model-only step-0 checkpoint DIR/step00000000.h5 (+ DIR/latest.h5)\n"
    "that `moet train --config MOE.ini --init DIR` trains from. Embeddings, attention and norms\n"
    "are copied; each expert is a copy of the dense MLP (G = 1) or one of its G slices of width\n"
    "d_ff/G, each slice in E/G experts, down_proj scaled by G; the router is drawn from\n"
    "N(0, S), one row per copy shared by its G slices. With [moe] norm_topk_prob = true the\n"
    "MoE model computes what the dense one does (same logits up to rounding); with false its\n"
    "MLP output is the dense one times the top-k probability mass.\n"
    "\n"
    "  --dense CKPT       the dense parent ([moe] n_experts = 0)\n"
    "  --config MOE.ini   the MoE model: same [model] shapes as the parent, n_experts > 0,\n"
    "                     expert_d_ff = d_ff / G, n_experts and top_k multiples of G\n"
    "  --out DIR          the output folder (created; must not hold checkpoints yet)\n"
    "  --granularity G    slices per dense MLP (default 1: every expert a full copy)\n"
    "  --router-std S     std of the router's normal draw (default 0.02)\n"
    "  --seed N           seed of the router draw (default: the MoE config's train.seed)\n"
    "  --set k=v          override a key of MOE.ini, e.g. --set moe.norm_topk_prob=true\n"
    "                     (repeatable)\n";

typedef struct {
    const char *dense, *config, *out;
    char *sets[MAX_SETS_];
    int n_sets;
    int granularity;
    float router_std;
    int have_seed;
    uint64_t seed;
} UpcycleArgs;

static int parse_num_(const char *flag, const char *s, double lo, double *v, MoetErr *err) {
    char *endp;
    errno = 0;
    *v = strtod(s, &endp);
    if (!*s || *endp || errno || !isfinite(*v) || *v < lo)
        return moet_errf(err, MOET_EUSAGE, "upcycle: %s needs a number >= %g, not '%s'", flag, lo,
                         s);
    return MOET_OK;
}

static int parse_args_(int argc, char **argv, UpcycleArgs *a, int *help, MoetErr *err) {
    memset(a, 0, sizeof *a);
    a->granularity = 1;
    a->router_std = 0.02f;
    *help = 0;
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        double num;
        int rc;
        if (strcmp(s, "--help") == 0 || strcmp(s, "-h") == 0) {
            *help = 1;
            return MOET_OK;
        }
        const int takes_val = !strcmp(s, "--dense") || !strcmp(s, "--config") ||
                              !strcmp(s, "--out") || !strcmp(s, "--granularity") ||
                              !strcmp(s, "--router-std") || !strcmp(s, "--seed") ||
                              !strcmp(s, "--set");
        if (!takes_val)
            return moet_errf(err, MOET_EUSAGE, "upcycle: unknown %s %s (see moet upcycle --help)",
                             s[0] == '-' ? "option" : "argument", s);
        if (!v)
            return moet_errf(err, MOET_EUSAGE,
                             "upcycle: %s needs a value (see moet upcycle --help)", s);
        i++;
        if (!strcmp(s, "--dense")) {
            a->dense = v;
        } else if (!strcmp(s, "--config")) {
            a->config = v;
        } else if (!strcmp(s, "--out")) {
            a->out = v;
        } else if (!strcmp(s, "--granularity")) {
            if ((rc = parse_num_(s, v, 1, &num, err))) return rc;
            if (num != floor(num) || num > 1 << 20)
                return moet_errf(err, MOET_EUSAGE,
                                 "upcycle: --granularity needs a whole number >= 1, not '%s'", v);
            a->granularity = (int)num;
        } else if (!strcmp(s, "--router-std")) {
            if ((rc = parse_num_(s, v, 0, &num, err))) return rc;
            a->router_std = (float)num;
        } else if (!strcmp(s, "--seed")) {
            char *endp;
            errno = 0;
            a->seed = strtoull(v, &endp, 10);
            if (!*v || *endp || errno || v[0] == '-')
                return moet_errf(err, MOET_EUSAGE,
                                 "upcycle: --seed needs a whole number >= 0, not '%s'", v);
            a->have_seed = 1;
        } else { // --set
            if (a->n_sets == MAX_SETS_)
                return moet_errf(err, MOET_EUSAGE, "upcycle: more than %d --set options",
                                 MAX_SETS_);
            a->sets[a->n_sets++] = argv[i];
        }
    }
    if (!a->dense || !a->config || !a->out)
        return moet_errf(err, MOET_EUSAGE, "upcycle: missing %s (see moet upcycle --help)",
                         !a->dense    ? "--dense CKPT"
                         : !a->config ? "--config MOE.ini"
                                      : "--out DIR");
    return MOET_OK;
}

// Checkpoint retention would delete the older checkpoints of a folder that has some (and a
// step-0 file would sit among a run's later ones): DIR must be new or hold no checkpoints.
static int check_out_dir_(const char *dir, MoetErr *err) {
    DIR *d = opendir(dir);
    if (!d) return MOET_OK; // created by ckpt_save
    struct dirent *e;
    int rc = MOET_OK;
    while ((e = readdir(d)) && !rc) {
        size_t n = strlen(e->d_name);
        if (strcmp(e->d_name, "latest.h5") == 0 ||
            (strncmp(e->d_name, "step", 4) == 0 && n > 3 && strcmp(e->d_name + n - 3, ".h5") == 0))
            rc = moet_errf(err, MOET_EUSAGE,
                           "upcycle: %s already holds checkpoints (%s): give --out a new folder "
                           "(upcycling must not overwrite or rotate away a run's checkpoints)",
                           dir, e->d_name);
    }
    closedir(d);
    return rc;
}

// Architecture keys that change no shape but change what the model computes.
static void warn_differences_(const Config *d, const Config *m, const UpcycleArgs *a,
                              const char *dpath) {
    if (d->n_heads != m->n_heads)
        moet_log("moet upcycle: warning: [model] n_heads is %d in %s but %d in %s: the attention "
                 "differs, the step-0 output will not equal the dense model's\n",
                 d->n_heads, dpath, m->n_heads, a->config);
    if (d->rope_theta != m->rope_theta || d->norm_eps != m->norm_eps)
        moet_log("moet upcycle: warning: [model] rope_theta / norm_eps differ (%g / %g in %s, "
                 "%g / %g in %s): the step-0 output will not equal the dense model's exactly\n",
                 (double)d->rope_theta, (double)d->norm_eps, dpath, (double)m->rope_theta,
                 (double)m->norm_eps, a->config);
    if (!m->norm_topk_prob)
        moet_log("moet upcycle: warning: [moe] norm_topk_prob = false in %s: the MoE layers' "
                 "step-0 output is the dense MLP's times the top-k probability mass (not equal "
                 "to it); set moe.norm_topk_prob=true for an exact upcycle\n",
                 a->config);
}

static void print_summary_(const Config *d, const Config *m, const UpcycleArgs *a,
                           const UpcycleOpts *o, const char *dpath, const char *saved) {
    const int G = a->granularity, E = m->n_experts;
    printf("upcycled %s (dense, d_ff %d) -> %s\n", dpath, d->d_ff, saved);
    printf("  copied: embed_tokens, lm_head, norms and attention of %d layers\n", m->n_layers);
    if (G == 1)
        printf("  experts: %d copies of the dense MLP per layer (expert_d_ff %d)\n", E,
               m->expert_d_ff);
    else
        printf("  experts: granularity %d: the dense MLP cut into %d slices of width %d, each "
               "in %d experts (expert e = copy e/%d, slice e%%%d), down_proj x %d\n",
               G, G, m->expert_d_ff, E / G, G, G, G);
    printf("  router: N(0, %g), seed %llu%s; top_k %d, norm_topk_prob %s\n", (double)o->router_std,
           (unsigned long long)o->seed, G > 1 ? ", one row per copy shared by its slices" : "",
           m->top_k,
           m->norm_topk_prob ? "true (step-0 output = the dense model's)"
                             : "false (step-0 output scaled by the top-k mass)");
    printf("train from it: moet train --config %s", a->config);
    for (int i = 0; i < a->n_sets; i++) printf(" --set %s", a->sets[i]);
    printf(" --init %s\n", a->out);
}

int cmd_upcycle(int argc, char **argv, MoetErr *err) {
    UpcycleArgs a;
    int help, rc = parse_args_(argc, argv, &a, &help, err);
    if (rc) return rc;
    if (help) {
        fputs(UPCYCLE_HELP, stdout);
        return MOET_OK;
    }
    char dpath[1100];
    Config dc, mc, build;
    if ((rc = ckpt_resolve(a.dense, ".", dpath, sizeof dpath, err))) return rc;
    if ((rc = ckpt_load_config(dpath, 0, NULL, &dc, err))) return rc;
    if ((rc = config_from_cli(&mc, a.config, a.n_sets, a.sets, err))) return rc;
    UpcycleOpts o = {.granularity = a.granularity,
                     .router_std = a.router_std,
                     .seed = a.have_seed ? a.seed : mc.seed,
                     .dense_name = dpath,
                     .moe_name = a.config};
    if ((rc = upcycle_check(&dc, &mc, &o, err))) return rc;
    if ((rc = check_out_dir_(a.out, err))) return rc;
    warn_differences_(&dc, &mc, &a, dpath);

    // the saved config is the MoE run's as given (its ep included); the models are built on the
    // CPU with every expert here
    const int ini_len = config_to_ini(&mc, NULL, 0);
    char *ini = moet_malloc((size_t)ini_len + 1);
    config_to_ini(&mc, ini, ini_len + 1);
    build = mc;
    build.ep = 1;
    Model dm, mm;
    memset(&dm, 0, sizeof dm);
    memset(&mm, 0, sizeof mm);
    int have_d = 0, have_m = 0;
    char saved[1200];
    if ((rc = model_create_inference(&dm, &dc, ops_cpu(), err))) goto done;
    have_d = 1;
    if ((rc = ckpt_load_model(dpath, &dm, err))) goto done;
    if ((rc = model_create_inference(&mm, &build, ops_cpu(), err))) goto done;
    have_m = 1;
    if ((rc = upcycle_model(&dm, &mm, &o, err))) goto done;
    model_free(&dm);
    have_d = 0;

    TrainState st;
    memset(&st, 0, sizeof st);
    st.data.seed = mc.seed;
    const CkptSaveOpts so = {.dir = a.out, .keep_last = 1, .keep_every = 0, .model_only = 1};
    if ((rc = ckpt_save(&so, &mm, NULL, NULL, &st, ini, saved, sizeof saved, err))) goto done;
    print_summary_(&dc, &mc, &a, &o, dpath, saved);
done:
    free(ini);
    if (have_d) model_free(&dm);
    if (have_m) model_free(&mm);
    return rc;
}
