// ckpt: HDF5 checkpoints (ARCHITECTURE §6): OUT/stepNNNNNNNN.h5 with /model, /optim and
// /trainer, every dataset carrying a checksum; written under a temporary name and renamed,
// OUT/latest.h5 a symlink updated atomically, keep_last / keep_every retention.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "data/loader.h"
#include "train/common.h"
#include "train/model.h"

// What a checkpoint stores besides the tensors (the /trainer group and root attributes).
typedef struct {
    int64_t step;           // optimizer steps completed
    int64_t tokens_seen;    // training tokens consumed, all ranks
    int64_t optim_step;     // AdamW's t (bias correction), = step unless restarted by --init
    LoaderPos data;         // training data position: seed, epoch, consumed, fingerprint
    uint64_t rng_state;     // the trainer's random state (reserved: dropout-free models use none)
    double lr;              // the learning rate of the last step (informational)
} TrainState;

typedef struct {
    const char *dir;        // checkpoint.dir
    int keep_last;          // rotating checkpoints kept (>= 1)
    int keep_every;         // also keep every step that is a multiple of keep_every (0: none)
    int model_only;         // 1: no /optim group
} CkptSaveOpts;

// Saves the checkpoint of step st->step: the model (its host copy m->params_h: on a GPU call
// model_download_params first), the AdamW moments (HOST buffers exp_avg, exp_avg_sq, laid out
// like m->params; NULL with model_only), st, and the config INI text. Writes
// DIR/stepNNNNNNNN.h5.tmp, renames it, points DIR/latest.h5 at it, then applies retention.
// The file's disk space is reserved (posix_fallocate) before HDF5 writes, so a full disk fails
// cleanly up front. On failure (e.g. disk full) the temporary file is removed, earlier
// checkpoints and latest.h5 are untouched, and the message says so. path_out (may be NULL)
// receives the final path. Single rank for now: a model holding only some experts is refused.
int ckpt_save(const CkptSaveOpts *o, const Model *m, const float *exp_avg,
              const float *exp_avg_sq, const TrainState *st, const char *config_ini,
              char *path_out, size_t path_out_size, MoetErr *err);

// The most experts-parallel ranks ckpt_save_par combines checksums for.
#define MOET_CKPT_MAX_EP 1024

// ckpt_save for a run of several ranks; every rank of par->world calls it. Without expert
// parallelism (every rank holds the same weights) rank 0 calls ckpt_save and the others return
// MOET_OK at once (the caller agrees on the outcome). With experts split over ranks the file is
// written collectively with parallel HDF5 (MPI-IO on MPI_COMM_WORLD): replicated tensors by
// rank 0, expert tensors by the ranks of EP group 0 each its hyperslab, the checksum of each
// expert tensor combined from the slices' CRCs (crc32_combine in expert order); rank 0 reserves
// the space, renames, updates latest.h5 and applies retention; all ranks return the outcome.
int ckpt_save_par(const CkptSaveOpts *o, const Model *m, const float *exp_avg,
                  const float *exp_avg_sq, const TrainState *st, const char *config_ini,
                  Parallel *par, char *path_out, size_t path_out_size, MoetErr *err);

// Resolves "latest" (DIR/latest.h5 of dir), a directory (its latest.h5) or a file path. A
// latest.h5 symlink is followed to DIR/stepNNNNNNNN.h5 (logs name the step; a concurrent save
// cannot swap the file under the loader). Errors: "no checkpoint in DIR yet", missing file.
int ckpt_resolve(const char *spec, const char *dir, char *path, size_t path_size, MoetErr *err);

// Loads a checkpoint into m (shapes checked against the config, every checksum verified, each
// expert read exactly once; into m->params_h, then uploaded to the model's backend), and when
// exp_avg / exp_avg_sq / st are not NULL, the optimizer state into those HOST buffers (on a GPU
// the caller uploads them: optim_upload) and the trainer state (a model-only file then is an
// error naming it). The file format does not depend on the device: a run may resume on the
// other one.
int ckpt_load(const char *path, Model *m, float *exp_avg, float *exp_avg_sq, TrainState *st,
              MoetErr *err);

// Reads only the trainer state of a checkpoint (its /trainer attributes, no tensors), for tools
// that need its step and data position without the model (`moet trace`). A model-only file
// has none: an error naming the file.
int ckpt_read_state(const char *path, TrainState *st, MoetErr *err);

// Verifies every dataset's checksum; prints nothing. Error names the file and the tensor.
int ckpt_verify(const char *path, MoetErr *err);
// ckpt_verify that also reports how many datasets it verified (for `moet inspect --verify`).
int ckpt_verify_count(const char *path, int *n_verified, MoetErr *err);

// Reads the root attribute `config` (the INI text of the run). *text is malloc'ed.
int ckpt_read_config_text(const char *path, char **text, MoetErr *err);

// The run's configuration of the checkpoint at path (a resolved file), with the --set style
// overrides sets[0..n_sets) applied and ep = 1 (one rank holding every expert: evaluation,
// generation, conversion), validated. Errors name the file and the key.
int ckpt_load_config(const char *path, int n_sets, char *const *sets, Config *c, MoetErr *err);

// Loads every tensor of m from /model/<name> in path (into m->params_h, then uploaded): checks each shape against the model's
// global shape and reads this rank's experts [expert_lo, expert_lo + El) by hyperslab.
// Checksums are verified where present (HF fixture files have none; ckpt_load requires them).
int ckpt_load_model(const char *path, Model *m, MoetErr *err);

typedef enum { CKPT_F32, CKPT_F64, CKPT_I32 } CkptType;
// Reads the whole dataset `name` (e.g. "/reference/logits") converted to `type` into buf,
// which holds n elements; the dataset must have exactly n elements.
int ckpt_read_array(const char *path, const char *name, CkptType type, void *buf, size_t n,
                    MoetErr *err);
