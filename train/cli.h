// cli: the subcommands of `moet`, one function each, dispatched by main.c. Each takes argc/argv
// starting at the command name, prints its own --help, and returns 0, MOET_EUSAGE (bad usage or
// configuration) or MOET_EFAIL with the message in err.
#pragma once
#include "train/common.h"

int cmd_info(int argc, char **argv, MoetErr *err);
int cmd_bench(int argc, char **argv, MoetErr *err);
int cmd_tokenize(int argc, char **argv, MoetErr *err);   // train/cmd_tokenize.c
int cmd_train(int argc, char **argv, MoetErr *err);      // train/cmd_train.c
int cmd_inspect(int argc, char **argv, MoetErr *err);    // train/cmd_inspect.c
int cmd_eval(int argc, char **argv, MoetErr *err);       // train/cmd_eval.c
int cmd_generate(int argc, char **argv, MoetErr *err);   // train/cmd_generate.c
int cmd_upcycle(int argc, char **argv, MoetErr *err);    // train/cmd_upcycle.c
int cmd_export_hf(int argc, char **argv, MoetErr *err);  // train/cmd_hf.c
int cmd_import_hf(int argc, char **argv, MoetErr *err);  // train/cmd_hf.c
int cmd_trace(int argc, char **argv, MoetErr *err);      // train/cmd_trace.c
