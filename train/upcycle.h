// upcycle: a dense model -> an MoE model whose output equals the dense one at step 0 (sparse
// upcycling, Komatsuzaki et al. 2022; granularity and virtual groups, He et al. 2024,
// arXiv 2410.07524). Embeddings, attention and norms are copied; the experts are copies (or
// slices) of the dense MLP; the router is drawn from N(0, router_std).
#pragma once
#include <stdint.h>

#include "train/common.h"
#include "train/config.h"
#include "train/model.h"

typedef struct {
    // G: the dense MLP (width d_ff) is cut into G slices of width expert_d_ff = d_ff / G, and
    // expert e = j*G + s holds slice s of copy j (j < E/G); gate/up rows and down columns of
    // the slice, down scaled by G. Needs E % G == 0 and top_k % G == 0 (see upcycle_check).
    int granularity;
    float router_std;       // the router is N(0, router_std), not truncated (0: all zeros)
    uint64_t seed;          // keys the router draw with the tensor name and element index
    const char *dense_name; // for messages: the dense checkpoint (or "the dense model")
    const char *moe_name;   // for messages: the MoE config file (or "the MoE config")
} UpcycleOpts;

// Checks that dense (n_experts = 0) can be upcycled into moe (n_experts > 0) with
// o->granularity: every non-MLP tensor has the same shape in both, d_ff = G * expert_d_ff,
// E % G == 0, top_k % G == 0. Errors (MOET_EUSAGE) name the tensor or key and say what to set.
// Needs no model: the command calls it before allocating anything.
int upcycle_check(const Config *dense, const Config *moe, const UpcycleOpts *o, MoetErr *err);

// Fills moe->params_h from dense->params_h (upcycle_check first), then uploads moe's params.
// moe must hold every expert (ep_size 1). With moe.norm_topk_prob = true the MoE layer's output
// equals the dense MLP's (top-k ties are taken in index order, so whole copies are picked); with
// false it is the dense output times the top-k probability mass.
int upcycle_model(const Model *dense, Model *moe, const UpcycleOpts *o, MoetErr *err);
