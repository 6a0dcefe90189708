// ckpt: HDF5 checkpoints (ARCHITECTURE §6). This first part reads the /model group and the
// config attribute into a model of any expert layout; writing, checksums, optimizer state and
// the trainer group come with the trainer.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "train/common.h"
#include "train/model.h"

// Reads the root attribute `config` (the INI text of the run). *text is malloc'ed.
int ckpt_read_config_text(const char *path, char **text, MoetErr *err);

// Loads every tensor of m from /model/<name> in path: checks each shape against the model's
// global shape and reads this rank's experts [expert_lo, expert_lo + El) by hyperslab.
int ckpt_load_model(const char *path, Model *m, MoetErr *err);

typedef enum { CKPT_F32, CKPT_F64, CKPT_I32 } CkptType;
// Reads the whole dataset `name` (e.g. "/reference/logits") converted to `type` into buf,
// which holds n elements; the dataset must have exactly n elements.
int ckpt_read_array(const char *path, const char *name, CkptType type, void *buf, size_t n,
                    MoetErr *err);
