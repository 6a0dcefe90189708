// config: the run configuration, read from an INI file (inih) plus `--set section.key=value`
// overrides, and validated as a whole before anything runs (ARCHITECTURE §7). Errors name the
// file (or the --set), the key and the reason, and return MOET_EUSAGE (exit status 2).
#pragma once
#include <stdint.h>
#include <stdio.h>

#include "train/common.h"

typedef struct {
    // [model]
    int d_model;
    int n_layers;
    int n_heads;
    int vocab_size;      // the tokenizer's vocabulary; the model pads it to padded_vocab
    int max_seq_len;
    float rope_theta;
    float norm_eps;
    int d_ff;            // dense MLP width (n_experts = 0)
    float init_std;      // truncated normal std (cut at +-3 std)
    // [moe]
    int n_experts;       // 0 = dense
    int top_k;
    int expert_d_ff;
    int norm_topk_prob;  // bool
    float lb_coef;
    float z_coef;
    char router[16];        // softmax | sigmoid: the router's score function
    char lb_scope[16];      // micro_batch | global_batch: where f_e of the lb loss is counted
    float bias_update_rate; // aux-loss-free balancing: the expert bias step (0 = off)
    // [train]
    int seq_len;
    int micro_batch;     // sequences per micro-batch per rank
    int global_batch;    // sequences per optimizer step, all ranks
    int max_steps;
    uint64_t seed;
    char device[16];     // cpu | cuda
    char precision[8];   // auto | fp32 | bf16 (GEMMs; auto: bf16 on cuda, fp32 on cpu)
    int eval_every;
    int eval_batches;
    int log_every;
    char recompute[8];   // none | full: activation recomputation in backward
    // [optim]
    float lr;
    float min_lr;
    int warmup_steps;
    char schedule[16];   // cosine | linear | constant
    float beta1, beta2, eps;
    float weight_decay;
    float grad_clip;     // 0 = off
    // [data]
    char train[1024];    // glob
    char valid[1024];    // glob (may be empty)
    char tokenizer[1024];
    int eos_id;
    // [checkpoint]
    char ckpt_dir[1024];
    int ckpt_every;
    int keep_last;
    int keep_every;
    int model_only;      // bool
    // [parallel]
    int ep;
    char comm[16];       // auto | mpi | nccl
    int zero;            // 0 | 1: ZeRO stage (1 = AdamW moments sharded over the DP ranks)
    int bucket_mb;       // gradient all-reduce bucket size in MB
    int timeout_s;       // a collective that takes longer aborts the job (0 = never)
    int a2a_overlap;     // bool: the MoE backward returns input gradients while it computes
                         // the expert weight gradients
    // [log]
    char metrics[1024];  // metrics file name inside ckpt_dir

    // derived (by config_validate)
    int padded_vocab;    // vocab_size rounded up to a multiple of 128
    int head_dim;
    // internal: which keys the file or --set gave (indexed by the key table in config.c)
    unsigned char given_[128];
} Config;

// Sets every key to its default (OLMoE values where OLMoE has one). Keys without a default
// (the model's shape, the batch) must then come from the file or --set; until then they hold
// an out-of-range value (0, or -1 for n_experts), so that code which fills the fields itself
// instead of loading INI text also passes config_validate.
void config_defaults(Config *c);

// Reads an INI file into c, on top of the defaults (it calls config_defaults first, so load,
// then config_set, then config_validate). `path` is used in messages.
int config_load_file(Config *c, const char *path, MoetErr *err);
// Reads INI text (e.g. the config attribute of a checkpoint) the same way; `origin` names it
// in messages.
int config_load_string(Config *c, const char *text, const char *origin, MoetErr *err);
// Applies one "section.key=value" override.
int config_set(Config *c, const char *assignment, MoetErr *err);
// Checks that every required key was given and that the values are consistent; fills the
// derived fields. `origin` (the file name) is used in messages.
int config_validate(Config *c, const char *origin, MoetErr *err);

// Convenience for the CLI: defaults + file + overrides + validate (path NULL: no file).
int config_from_cli(Config *c, const char *path, int n_sets, char *const *sets, MoetErr *err);

// Writes the resolved configuration as INI text (every key, with its section). Returns the
// number of characters that the full text needs (like snprintf; buf may be NULL with size 0).
// config_load_string of the text gives back the same Config (floats are printed exactly).
int config_to_ini(const Config *c, char *buf, int bufsize);
// config_to_ini's text plus the derived fields, for `moet info`.
void config_print(const Config *c, FILE *f);
// Lists every key as "section.key  default  help", for --help texts.
void config_print_keys(FILE *f);
