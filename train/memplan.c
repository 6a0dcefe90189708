// memplan: memory and communication per rank, predicted from the config (see memplan.h). Every
// number restates what the trainer allocates and sends; the comments name the code it follows.
#include "train/memplan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/model.h"

// ceil(a / b) of whole numbers held in doubles (exact below 2^53)
static double ceil_div_(double a, double b) {
    long long x = (long long)a, y = (long long)b;
    return (double)((x + y - 1) / y);
}

void memplan_predict(const Config *c, int world, MemPlan *mp) {
    memset(mp, 0, sizeof *mp);
    const int ep = c->ep > 0 ? c->ep : 1;
    if (world < ep) world = ep;
    const int B = c->micro_batch, T = c->seq_len, L = c->n_layers, D = c->d_model;
    const int E = c->n_experts > 0 ? c->n_experts : 0;
    const int K = E > 0 ? c->top_k : 0, F = E > 0 ? c->expert_d_ff : c->d_ff;
    const int recompute = strcmp(c->recompute, "full") == 0;
    const int on_device = strcmp(c->device, "cuda") == 0 || strcmp(c->device, "cpu-shadow") == 0;
    // comm_use_backend: auto is NCCL on cuda (one rank per GPU), MPI elsewhere
    const int mpi = strcmp(c->comm, "mpi") == 0 ||
                    (strcmp(c->comm, "auto") == 0 && strcmp(c->device, "cuda") != 0);
    int accum = c->global_batch / (B * world);
    if (accum < 1) accum = 1;
    mp->accum = accum;
    mp->edp = world / ep;

    // parameters: the shared tensors on every rank, the experts split over the EP group; the
    // buffers hold model_tensor_table's layout (every tensor padded to 16 floats)
    double n = 0, p_shared = 0, p_expert = 0; // floats: buffer, shared and expert elements
    double big_shared = 0, big_expert = 0;    // the largest tensor of each (elements)
    ParamTensor *t = NULL;
    int nt = 0;
    size_t n_params = 0;
    MoetErr err;
    if (model_tensor_table(c, 0, ep, &t, &nt, &n_params, &err) == MOET_OK) {
        n = (double)n_params;
        for (int i = 0; i < nt; i++) {
            double *sum = t[i].is_expert ? &p_expert : &p_shared;
            double *big = t[i].is_expert ? &big_expert : &big_shared;
            *sum += (double)t[i].numel;
            if ((double)t[i].numel > *big) *big = (double)t[i].numel;
        }
        free(t);
    } else { // ep does not divide the experts (config_validate refuses it): unpadded counts
        ParamCounts pc;
        model_param_counts(c, &pc);
        p_shared = big_shared = (double)(pc.total - pc.experts);
        p_expert = big_expert = (double)pc.experts / ep;
        n = p_shared + p_expert;
    }
    mp->local_params = n;
    mp->params = n * 4;
    // model_create_ops: params + grads; trainer_run: gacc (n floats) when accum > 1
    mp->grads = n * 4 * (accum > 1 ? 2 : 1);
    // AdamW exp_avg + exp_avg_sq. ZeRO-1 (optim_create_sharded): the shared tensors' elements
    // end to end, cut into world parts, and this rank's experts' elements into edp parts (rank
    // 0 holds the ceil of each; the last rank may hold less)
    if (c->zero)
        mp->optim = 8 * (ceil_div_(p_shared, world) + ceil_div_(p_expert, mp->edp));
    else
        mp->optim = 8 * n;
    mp->activations = (double)model_activation_floats(c, B, T, E > 0 ? E / ep : 0) * 4;

    // dispatcher (ep > 1): per layer the received rows' x (rows,D) and g,u,a (rows,F) are kept
    // for backward, with the layer's row permutation and its inverse (2 int32 per row); with
    // recompute = full one layer's set serves all (the rerun forward refills it); raw, y, d_y,
    // d_x (rows,D) and d_g, d_u, d_a (rows,F) are scratch shared by the layers. Balanced
    // routing receives R rows; the buffers grow to rows + rows/2 + 16.
    const double R = (double)B * T * K;
    mp->routed_rows = R;
    if (ep > 1 && E > 0) {
        double cap = R + (double)((long long)R / 2) + 16;
        double held = strcmp(c->recompute, "full") == 0 ? 1 : L;
        mp->dispatch = 4 * cap * (held * (D + 3.0 * F + 2) + 4.0 * D + 3.0 * F);
    }
    // the CUDA attention keeps one sequence's (H,T,T) scores and their gradient
    if (strcmp(c->device, "cuda") == 0) mp->scratch = 2.0 * c->n_heads * (double)T * T * 4;
    // bf16 GEMMs on cuda: the parameters' bf16 copy (kernels/cuda/weights.cu), unless
    // MOET_CUDA_WEIGHT_COPY=0 turns it off; then the ops convert their weights into the
    // operand workspace of kernels/cuda/gemm.cu, one buffer that grows to hold the largest
    // op's bf16 copies, in whole MiB and at least doubling each time, so at most twice that
    // need, and at most its 1 GiB chunk limit (the bound is taken). The largest ops are
    // backward ones: a matmul converts the rows of dout and inp, and without the copy its
    // weights (the projections, the experts' gate and up pair or the dense MLP, the LM head
    // per chunk of rows), the attention one sequence's q, k, v, dO and every head's P and dS.
    // (Bound: the ops' 256-byte alignment of each slice is left out.)
    if (strcmp(c->device, "cuda") == 0 && strcmp(c->precision, "fp32") != 0) {
        const char *wc = getenv("MOET_CUDA_WEIGHT_COPY");
        // 1: the weights are read from the copy; 0: converted into the workspace (wk = 1)
        const double wcopy = wc && strcmp(wc, "0") == 0 ? 0.0 : 1.0;
        mp->weight_copy = wcopy * n * 2;
        const double N = (double)B * T, V = c->padded_vocab, H = c->n_heads;
        const double El = E > 0 ? (double)E / ep : 1, rows = E > 0 ? (double)B * T * K : N;
        const double hr = model_head_rows(c, B, T), wk = 1.0 - wcopy;
        double need = wk * D * D + N * 2.0 * D;              // q, k, v, o projections
        // experts: the gate and up pair (two weights, two dout slices, the input rows); the
        // dense MLP: one matmul at a time
        double mlp = E > 0 ? wk * 2 * El * F * D + rows * (2.0 * F + D)
                           : wk * F * D + N * ((double)F + D);
        double head = wk * V * D + hr * (V + D);              // LM head, one chunk of rows
        double att = 4.0 * T * D + 2.0 * H * T * T;           // attention backward
        need = need > mlp ? need : mlp;
        need = need > head ? need : head;
        need = need > att ? need : att;
        double ws = 2 * ceil_div_(need * 2, 1 << 20) * (1 << 20);
        mp->scratch += ws < (double)(1 << 30) ? ws : (double)(1 << 30);
        // cuBLASLt's workspace (gemm.cu, LT_WORKSPACE_BYTES) per stream: the legacy stream's,
        // and for an MoE those of the 4 side streams of the expert GEMMs (GEMM_LANES_DEFAULT,
        // MOET_CUDA_GEMM_STREAMS)
        mp->scratch += (E > 0 ? 5.0 : 1.0) * (32 << 20);
    }
    // bf16 GEMMs on cpu (kernels/cpu/gemm_bf16.c): the parameters' bf16 copy, unless
    // MOET_CPU_WEIGHT_COPY=0 turns it off, and two bf16 buffers that grow by doubling, so at
    // most twice their largest need. A holds an op's rows (inp forward, dout backward), B the
    // rows of inp for the weight gradient, and without the copy the op's weights. The ops: the
    // projections (N rows), each local expert's rows (balanced: N*K*ep/E; the dense MLP: N),
    // the LM head per chunk of rows.
    if (strcmp(c->device, "cpu") == 0 && strcmp(c->precision, "bf16") == 0) {
        const char *wc = getenv("MOET_CPU_WEIGHT_COPY");
        const int wcopy = !(wc && strcmp(wc, "0") == 0);
        mp->weight_copy = wcopy ? n * 2 : 0.0;
        const double N = (double)B * T, V = c->padded_vocab;
        const double ne = E > 0 ? N * K * ep / E : N, DF = D > F ? D : F;
        const double hr = model_head_rows(c, B, T);
        double a = N * D, b = N * D;
        a = a > ne * DF ? a : ne * DF;
        b = b > ne * DF ? b : ne * DF;
        a = a > hr * V ? a : hr * V;
        if (!wcopy) {
            b = b > (double)D * D ? b : (double)D * D;
            b = b > (double)F * D ? b : (double)F * D;
            b = b > V * D ? b : V * D;
        }
        mp->scratch += 2 * 2 * (a + b);
    }
    mp->total = mp->params + mp->grads + mp->optim + mp->activations + mp->dispatch + mp->scratch +
                mp->weight_copy;

    if (world == 1) return; // one rank: no collectives, no staging
    // host staging of device buffers over MPI (comm.c's stage_, one buffer per group, as large
    // as the largest call): the world's and the EDP group's gradient all-reduces go per span of
    // a bucket (gradsync.c: closed once bucket_mb is reached, so at most bucket_mb + its last
    // tensor), ZeRO-1 all-gathers the group's whole parameters; the EP group sends R rows out
    // and receives R back (balanced)
    if (on_device && mpi) {
        const double bucket = (double)c->bucket_mb * (1 << 20) / 4;
        double w = p_shared < bucket + big_shared ? p_shared : bucket + big_shared;
        double e = p_expert < bucket + big_expert ? p_expert : bucket + big_expert;
        if (c->zero) w = p_shared, e = p_expert;
        mp->host_stage = 4 * (w + (mp->edp > 1 ? e : 0)) + (ep > 1 ? 2 * R * D * 4 : 0);
    }
    // all-to-all (moe.c / dispatch.c, per layer and micro-batch): forward dispatch sends this
    // rank's R rows and the E counts (comm_alltoall_i64: E/ep to each of ep ranks, 8 bytes);
    // combine sends back the rows received; backward sends R rows of d_y out and the received
    // rows of d_x back. recompute = full reruns the forward of layers 0..L-2 in backward,
    // exchanges included.
    if (ep > 1 && E > 0) {
        const double fwd = L + (recompute ? L - 1 : 0);
        const double row = (double)D * 4;
        mp->a2a_exact_bytes = accum * (fwd * (R * row + E * 8.0) + L * R * row);
        mp->a2a_bytes = mp->a2a_exact_bytes + accum * (fwd + L) * R * row;
    }
    // all-reduce (trainer_run, gradsync.c): the gradients, per tensor (padding excluded): the
    // shared tensors over the world, the expert tensors over the EDP group when it has more
    // than one rank (ep 1: the world); then scalars as doubles (trainer_run): loss/ce/lb/z (4),
    // the expert loads (L*E), the expert part of the squared gradient norm (ep > 1,
    // optim_grad_norm_ep) and the non-finite flag (1).
    mp->allreduce_grad_bytes = 4 * (p_shared + (mp->edp > 1 ? p_expert : 0));
    mp->allreduce_bytes =
        mp->allreduce_grad_bytes + 8.0 * (4 + (double)L * E + (ep > 1 ? 1 : 0) + 1);
    // ZeRO-1: each rank contributes its updated shard to the parameter all-gather
    // (comm_buf_allgatherv_f32 counts counts[rank] floats)
    if (c->zero)
        mp->allgather_bytes =
            4 * (ceil_div_(p_shared, world) + (mp->edp > 1 ? ceil_div_(p_expert, mp->edp) : 0));
}

int memplan_format_peak(char *buf, size_t n, double peak_bytes, const MemPlan *mp) {
    const double mib = 1024.0 * 1024.0;
    return snprintf(buf, n, "memory: peak backend %.1f MiB per rank (predicted %.1f MiB)",
                    peak_bytes / mib, mp->total / mib);
}
