// gradsync: the data-parallel gradient sum of a step (ARCHITECTURE §4), in buckets that start
// while backward still runs. The tensors are taken in the order backward finishes them (final
// norm and lm_head, layers L-1 .. 0, the embedding) and cut into buckets of about bucket_bytes,
// each of one group: the shared tensors are summed over the world, the expert tensors over the
// expert-DP group (skipped when it has one rank). model_backward's hook (Model.grad_hook) tells
// when a part is final; a bucket starts when its last tensor is (comm_buf_allreduce_start_f32:
// on NCCL it overlaps the rest of backward on a communication stream). The sums are those of
// one all-reduce over the whole buffer, element for element: on MPI bit-identical to it.
#pragma once
#include <stddef.h>

#include "train/comm.h"
#include "train/model.h"

typedef struct GradSync GradSync;

int gradsync_create(GradSync **out, Model *m, Parallel *par, size_t bucket_bytes, MoetErr *err);
void gradsync_free(GradSync *g);

// Installs the hook for the next model_backward. sum: the buffer that holds the step's gradient
// sum and is reduced (m->grads, or the accumulation buffer of gradient accumulation: then each
// finished part of m->grads is first added into sum, as the trainer's accumulation does).
void gradsync_arm(GradSync *g, float *sum);
// After that backward: starts what is left, waits for every bucket, removes the hook. Returns
// the first collective error (a failed collective leaves the other ranks waiting: the caller
// aborts the job).
int gradsync_finish(GradSync *g, MoetErr *err);
// Buckets of the plan, for the log: count and floats of the largest.
void gradsync_plan(const GradSync *g, int *n_buckets, size_t *max_floats);
