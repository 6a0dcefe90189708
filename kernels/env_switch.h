// env_switch: the A/B switches that the backends read from the environment
// (MOET_CUDA_GEMM_OPERANDS, MOET_CUDA_GEMM_LT, MOET_CUDA_WEIGHT_COPY, MOET_CPU_WEIGHT_COPY...):
// one parser and one message format for all of them, header-only so that C and CUDA C share
// it without a link dependency between the two libraries.
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// The switch `name`: unset, empty or on_value give 1; off_value gives 0 and the note
// "name=off_value: off_note" on stderr, so that each log shows which path it ran; anything else
// is fatal, with a hint to run off_hint.
static inline int kernels_env_switch(const char *name, const char *on_value, const char *off_value,
                                     const char *off_note, const char *off_hint) {
    const char *s = getenv(name);
    if (!s || !*s || strcmp(s, on_value) == 0) return 1;
    if (strcmp(s, off_value) == 0) {
        fprintf(stderr, "moet: note: %s=%s: %s\n", name, off_value, off_note);
        return 0;
    }
    fprintf(stderr,
            "moet: fatal: %s=%s: expected %s (the default) or %s\n"
            "---> HINT: unset it, or set it to %s to run %s (the A/B comparison)\n",
            name, s, on_value, off_value, off_value, off_hint);
    exit(EXIT_FAILURE);
}
