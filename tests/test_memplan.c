// test_memplan: memplan_predict's arithmetic on a tiny MoE model whose numbers are worked out
// by hand below: the parameter, gradient and AdamW bytes per rank for ep 1 / 2 and zero 0 / 1
// (padding, accumulation buffer, ZeRO shards with a ceil), the all-to-all bytes for a known
// routed row count (recompute none / full), the all-reduce and all-gather bytes, the dispatcher,
// the CUDA scratch and the host staging. The activations come from model_activation_floats.
#include "train/memplan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"
#include "train/model.h"

// D = 8, L = 2, H = 2, V = 100 -> 128, E = 4, K = 2, F = 4, T = 8, B = 2.
// Tensors (elements; the buffer pads each to 16 floats):
//   embed, lm_head        128 x 8 = 1024 each
//   per layer: ln1, q_norm, k_norm, ln2   8 each (16 padded); q, k, v, o  64 each; router 32;
//              experts gate/up/down       E x F x D = 128 each (ep 2: 64 each)
//   final norm            8 (16 padded)
// shared elements  = 1024 + 2 x (4 x 8 + 4 x 64 + 32) + 8 + 1024 = 2696
// shared padded    = 1024 + 2 x (4 x 16 + 4 x 64 + 32) + 16 + 1024 = 2768
// expert elements  = 2 x 3 x 128 = 768 (ep 1), 384 (ep 2)
// buffer n_params  = 2768 + 768 = 3536 (ep 1), 2768 + 384 = 3152 (ep 2)
static const char *TINY_ =
    "[model]\nd_model = 8\nn_layers = 2\nn_heads = 2\nvocab_size = 100\nmax_seq_len = 8\n"
    "[moe]\nn_experts = 4\ntop_k = 2\nexpert_d_ff = 4\n"
    "[train]\nseq_len = 8\nmicro_batch = 2\nglobal_batch = 8\nmax_steps = 1\n"
    "[data]\neos_id = 99\n";

static void tiny_(Config *c, const char *extra) {
    char text[1024];
    snprintf(text, sizeof text, "%s%s", TINY_, extra);
    MoetErr err;
    int rc = config_load_string(c, text, "tiny", &err);
    if (!rc) rc = config_validate(c, "tiny", &err);
    if (rc) fprintf(stderr, "\n  %s\n", err.msg);
    CU_ASSERT_FATAL(rc == 0);
}

// the scalars the trainer all-reduces each step, as doubles: loss/ce/lb/z, the (L,E) expert
// loads, the non-finite flag, and (ep > 1) the expert part of the gradient norm
static double scalars_(int ep) {
    return 8.0 * (4 + 2 * 4 + 1 + (ep > 1 ? 1 : 0));
}

static void check_total_(const MemPlan *mp) {
    CU_ASSERT_DOUBLE_EQUAL(mp->total,
                           mp->params + mp->grads + mp->optim + mp->activations + mp->dispatch +
                               mp->scratch + mp->weight_copy,
                           0.0);
}

static void test_hand_counts_match_the_model(void) {
    Config c;
    tiny_(&c, "");
    ParamCounts pc;
    model_param_counts(&c, &pc);
    CU_ASSERT_EQUAL(pc.total, 2696 + 768);
    CU_ASSERT_EQUAL(pc.experts, 768);
    MemPlan mp;
    memplan_predict(&c, 1, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.local_params, 3536, 0.0);
    c.ep = 2;
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.local_params, 3152, 0.0);
}

// world 1: accumulation 8 / (2 x 1) = 4 micro-batches, so the trainer's accumulation buffer
// doubles the gradients; no communication, no staging
static void test_world1(void) {
    Config c;
    tiny_(&c, "");
    MemPlan mp;
    memplan_predict(&c, 1, &mp);
    CU_ASSERT_EQUAL(mp.accum, 4);
    CU_ASSERT_DOUBLE_EQUAL(mp.params, 3536 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.grads, 2 * 3536 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.optim, 2 * 3536 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.activations, 4.0 * model_activation_floats(&c, 2, 8, 4), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.dispatch, 0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.a2a_bytes + mp.allreduce_bytes + mp.allgather_bytes, 0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.host_stage, 0, 0.0);
    check_total_(&mp);
}

// world 2, ep 1: every tensor's gradients are all-reduced (gradsync.c: per tensor span,
// padding excluded), the experts over the EDP group = the world
static void test_world2_ep1(void) {
    Config c;
    tiny_(&c, "");
    MemPlan mp;
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_EQUAL(mp.accum, 2);
    CU_ASSERT_DOUBLE_EQUAL(mp.grads, 2 * 3536 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.allreduce_bytes, (2696 + 768) * 4 + scalars_(1), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.a2a_bytes, 0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.allgather_bytes, 0, 0.0);
}

// world 2, ep 2 (EDP groups of one rank): the shared tensors' elements are all-reduced per
// tensor (no padding), the experts not at all. R = B x T x K = 32 rows of 8 x 4 = 32 bytes.
// Per micro-batch and layer: dispatch R rows + E counts x 8 B, combine R (balanced), backward
// R out and R back: 4 x 32 x 32 + 32 = 4128 B; x 2 layers x 2 micro-batches = 16512.
// Dispatcher: capacity 32 + 16 + 16 = 64 rows of L x (D + 3F + 2) + 4D + 3F = 88 floats (the
// + 2: each layer's row permutation and its inverse, int32).
static void test_world2_ep2(void) {
    Config c;
    tiny_(&c, "[parallel]\nep = 2\n");
    MemPlan mp;
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_EQUAL(mp.edp, 1);
    CU_ASSERT_DOUBLE_EQUAL(mp.params, 3152 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.grads, 2 * 3152 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.optim, 2 * 3152 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.activations, 4.0 * model_activation_floats(&c, 2, 8, 2), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.routed_rows, 32, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.dispatch, 64 * 88 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.a2a_bytes, 16512, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.a2a_exact_bytes, 2 * 2 * (2 * 32 * 32 + 32), 0.0); // 8320
    CU_ASSERT_DOUBLE_EQUAL(mp.allreduce_bytes, 2696 * 4 + scalars_(2), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.allgather_bytes, 0, 0.0);
    check_total_(&mp);
}

// recompute = full reruns the forward of layers 0..L-2 = layer 0 in backward, exchanges
// included: + (2 x 32 x 32 + 32) per micro-batch = 16512 + 2 x 2080 = 20672. The arena shrinks,
// and the dispatcher keeps one layer's rows: 64 x (22 + 44) floats.
static void test_recompute_a2a(void) {
    Config c;
    tiny_(&c, "[parallel]\nep = 2\n[train]\nrecompute = full\n");
    MemPlan mp, none;
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.a2a_bytes, 20672, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.a2a_exact_bytes, 2 * (3 * (32 * 32 + 32) + 2 * 32 * 32), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.activations, 4.0 * model_activation_floats(&c, 2, 8, 2), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.dispatch, 64 * 66 * 4, 0.0);
    strcpy(c.recompute, "none");
    memplan_predict(&c, 2, &none);
    CU_ASSERT(mp.activations < none.activations);
}

// world 4, ep 2, zero 1 (accumulation 1: no extra gradient buffer): the moments of
// ceil(2696 / 4) = 674 shared and ceil(384 / 2) = 192 expert elements; the all-gather sends
// that shard; the expert gradients are all-reduced over the EDP group of 2.
static void test_zero1_ep2(void) {
    Config c;
    tiny_(&c, "[parallel]\nep = 2\nzero = 1\n");
    MemPlan mp;
    memplan_predict(&c, 4, &mp);
    CU_ASSERT_EQUAL(mp.accum, 1);
    CU_ASSERT_EQUAL(mp.edp, 2);
    CU_ASSERT_DOUBLE_EQUAL(mp.grads, 3152 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.optim, 2 * (674 + 192) * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.allgather_bytes, (674 + 192) * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.allreduce_bytes, (2696 + 384) * 4 + scalars_(2), 0.0);
    check_total_(&mp);
}

// world 3, ep 1, zero 1 (global batch 12: 2 micro-batches each): ceil(2696 / 3) = 899 shared and
// ceil(768 / 3) = 256 expert elements
static void test_zero1_ceil(void) {
    Config c;
    tiny_(&c, "[parallel]\nzero = 1\n");
    c.global_batch = 12;
    MemPlan mp;
    memplan_predict(&c, 3, &mp);
    CU_ASSERT_EQUAL(mp.accum, 2);
    CU_ASSERT_DOUBLE_EQUAL(mp.optim, 2 * (899 + 256) * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.allgather_bytes, (899 + 256) * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.allreduce_bytes, (2696 + 768) * 4 + scalars_(1), 0.0);
}

// cuda: 2 x H x T x T floats of attention scratch; MPI staging of device buffers in host
// memory, none over NCCL: per group the largest call (here a whole group: the 64 MB bucket
// holds every tensor), with ep the rows out and back
static void test_device_scratch_and_staging(void) {
    Config c;
    tiny_(&c, "[train]\ndevice = cuda\n[parallel]\ncomm = mpi\n");
    MemPlan mp;
    memplan_predict(&c, 2, &mp);
    // + the bf16 GEMM operand workspace: its largest op here is well under 1 MiB, and growing
    // by doubling it may reach twice that; + cuBLASLt's 32 MiB workspace on the legacy stream
    // and on each of the 4 side streams of the expert GEMMs
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 2 * 2 * 8 * 8 * 4 + (2 << 20) + 5 * (32 << 20), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.host_stage, (2696 + 768) * 4, 0.0);
    // + the parameters' bf16 copy for the GEMMs, 2 bytes each, unless MOET_CUDA_WEIGHT_COPY=0
    CU_ASSERT_DOUBLE_EQUAL(mp.weight_copy, 3536 * 2, 0.0);
    check_total_(&mp);
    setenv("MOET_CUDA_WEIGHT_COPY", "0", 1);
    memplan_predict(&c, 2, &mp);
    unsetenv("MOET_CUDA_WEIGHT_COPY");
    CU_ASSERT_DOUBLE_EQUAL(mp.weight_copy, 0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 2 * 2 * 8 * 8 * 4 + (2 << 20) + 5 * (32 << 20), 0.0);
    check_total_(&mp);
    strcpy(c.precision, "fp32"); // exact fp32 GEMMs: no workspace, no copy
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 2 * 2 * 8 * 8 * 4, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.weight_copy, 0, 0.0);
    strcpy(c.precision, "auto");
    check_total_(&mp);
    strcpy(c.comm, "auto");
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.host_stage, 0, 0.0);
    tiny_(&c, "[train]\ndevice = cpu-shadow\n[parallel]\nep = 2\n");
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.host_stage, 2696 * 4 + 2 * 32 * 32, 0.0); // EDP group of one
    strcpy(c.device, "cpu");
    memplan_predict(&c, 2, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.host_stage, 0, 0.0);
}

// precision = bf16 on cpu: the parameters' bf16 copy (2 bytes each) and the two bf16 operand
// buffers of kernels/cpu/gemm_bf16.c at twice their largest need. Here N = 16 rows, 8 rows per
// expert, D 8, F 4, V 128, one head chunk of 16 rows: A = max(16x8, 8x8, 16x128) = 2048;
// B = max(16x8, 8x8) = 128 (the rows of inp), and without the copy also the weights:
// max(8x8, 16x8, 4x8, 8x8, 128x8) = 1024; elements of 2 bytes, twice each.
static void test_cpu_bf16_workspace(void) {
    Config c;
    tiny_(&c, "[train]\nprecision = bf16\n");
    MemPlan mp;
    memplan_predict(&c, 1, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 2.0 * 2 * (2048 + 128), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.weight_copy, 3536 * 2, 0.0);
    check_total_(&mp);
    setenv("MOET_CPU_WEIGHT_COPY", "0", 1);
    memplan_predict(&c, 1, &mp);
    unsetenv("MOET_CPU_WEIGHT_COPY");
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 2.0 * 2 * (2048 + 1024), 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.weight_copy, 0, 0.0);
    check_total_(&mp);
    strcpy(c.precision, "auto"); // fp32 on cpu: none
    memplan_predict(&c, 1, &mp);
    CU_ASSERT_DOUBLE_EQUAL(mp.scratch, 0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(mp.weight_copy, 0, 0.0);
}

static void test_format_peak(void) {
    MemPlan mp = {.total = 3.0 * 1024 * 1024};
    char buf[128];
    memplan_format_peak(buf, sizeof buf, 2.5 * 1024 * 1024, &mp);
    CU_ASSERT_STRING_EQUAL(buf, "memory: peak backend 2.5 MiB per rank (predicted 3.0 MiB)");
}

int main(void) {
    const TuTest tests[] = {
        {"the hand-computed parameter counts are the model's", test_hand_counts_match_the_model},
        {"world 1: accumulation buffer, no communication", test_world1},
        {"world 2, ep 1: the whole gradient buffer all-reduced", test_world2_ep1},
        {"world 2, ep 2: experts split, all-to-all of R rows, dispatcher", test_world2_ep2},
        {"recompute full: the forward exchanges again", test_recompute_a2a},
        {"precision = bf16 on cpu: the operand buffers", test_cpu_bf16_workspace},
        {"world 4, ep 2, zero 1: moment shards, all-gather", test_zero1_ep2},
        {"world 3, zero 1: shards round up", test_zero1_ceil},
        {"cuda scratch, host staging over MPI", test_device_scratch_and_staging},
        {"the trainer's memory line", test_format_peak},
    };
    return tu_run("memplan", tests, (int)(sizeof tests / sizeof tests[0]));
}
