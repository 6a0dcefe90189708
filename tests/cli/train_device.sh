#!/usr/bin/env bash
# train_device: the trainer's GPU code paths without a GPU. `[train] device = cpu-shadow` runs
# the CPU kernels behind device pointers the host cannot dereference (kernels/cpu/ops_shadow.c),
# so everything the trainer does on a GPU (weights drawn on the host and uploaded, per-layer
# expert counts copied back, gradient accumulation and averaging on the device, optimizer state
# downloaded for checkpoints and uploaded on resume, gradients staged through host memory for
# the MPI all-reduce) runs here and must give the CPU backend's bits:
#   (a) 8 steps on cpu-shadow log the losses of 8 steps on cpu, bit for bit;
#   (b) a cpu checkpoint resumed on cpu-shadow, and a cpu-shadow checkpoint resumed on cpu,
#       continue bit-identically (the file does not depend on the device);
#   (c) mpirun -np 2 on cpu-shadow (staged all-reduce) logs the losses of one cpu rank;
#   (d) device = cuda in a process without a GPU fails with exit 1 and says what to do.
# Usage, from the repository root (ctest does this): bash tests/cli/train_device.sh PATH/TO/moet
source "$(dirname "$0")/common.bash" train_device "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
tokenize_sample

# run NP NAME DEVICE ARGS...: 8 steps of tiny-moe (evaluation every 4) into $tmp/NAME
run() {
    local np=$1 name=$2 dev=$3
    shift 3
    local cmd=("$MOET")
    [[ $np -gt 1 ]] && cmd=(mpirun -np "$np" --oversubscribe --mca btl tcp,self -x OMP_NUM_THREADS
                            "$MOET")
    rc=0
    timeout 240 "${cmd[@]}" train --config configs/tiny-moe.ini \
        --set "data.train=$tmp/train/*.npy" --set "data.valid=$tmp/valid/*.npy" \
        --set train.max_steps=8 --set checkpoint.every=4 --set train.eval_every=4 \
        --set train.eval_batches=2 --set "train.device=$dev" --set "checkpoint.dir=$tmp/$name" \
        "$@" >"$tmp/$name.out" 2>"$tmp/err" || rc=$?
}
# the logged losses and validation losses of a run, as written (%.17g)
losses() { grep -o '"step":[0-9]*[^}]*"loss":[^,]*\|"val_loss":[^,]*' "$tmp/$1/metrics.jsonl"; }

# (a)
run 1 cpu cpu
r1=$rc
run 1 shadow cpu-shadow
if [[ $r1 -ne 0 || $rc -ne 0 ]]; then
    bad "a: cpu and cpu-shadow runs" "exit $r1 / $rc"
elif [[ $(losses cpu | grep -c '"step"') -ne 8 ]]; then
    bad "a: cpu run" "expected 8 logged steps"
elif ! diff <(losses cpu) <(losses shadow) >/dev/null; then
    bad "a: cpu-shadow vs cpu" "$(diff <(losses cpu) <(losses shadow) | head -4)"
elif ! cmp -s <(h5dump -d /model/lm_head.weight "$tmp/cpu/step00000008.h5" | tail -n +3) \
              <(h5dump -d /model/lm_head.weight "$tmp/shadow/step00000008.h5" | tail -n +3); then
    bad "a: cpu-shadow vs cpu" "the step-8 lm_head weights differ"
else
    ok "a: 8 steps on cpu-shadow: losses, val losses and step-8 weights equal cpu's bit for bit"
fi

# (b) cross-device resume from step 4, both ways
for pair in "cpu shadow cpu-shadow" "shadow cpu cpu"; do
    set -- $pair
    from=$1 name=x$2 dev=$3
    mkdir -p "$tmp/$name" && cp "$tmp/$from/step00000004.h5" "$tmp/$name/"
    ln -s step00000004.h5 "$tmp/$name/latest.h5"
    run 1 "$name" "$dev" --resume latest
    if [[ $rc -ne 0 ]]; then
        bad "b: resume a $from checkpoint on $dev" "exit $rc"
    elif ! diff <(losses cpu | grep '"step":[5-8],') <(losses "$name" | grep '"step"') >/dev/null
    then
        bad "b: resume a $from checkpoint on $dev" \
            "$(diff <(losses cpu | grep '"step":[5-8],') <(losses "$name" | grep '"step"') | head -4)"
    else
        ok "b: the step-4 checkpoint of $from resumed on $dev: steps 5..8 bit-identical"
    fi
done

# (c) two ranks on cpu-shadow: the gradients leave the "device" for the MPI all-reduce. The
# training losses are bit-identical (trainer.h); evaluation, repeated on each rank with that
# rank's threads, may differ in the last bits, as in train_mpi.sh, so it is not compared.
run 2 mpi cpu-shadow
if [[ $rc -ne 0 ]]; then
    bad "c: mpirun -np 2 on cpu-shadow" "exit $rc"
elif ! diff <(losses cpu | grep '"step"') <(losses mpi | grep '"step"') >/dev/null; then
    bad "c: mpirun -np 2 on cpu-shadow" \
        "$(diff <(losses cpu | grep '"step"') <(losses mpi | grep '"step"') | head -4)"
else
    ok "c: mpirun -np 2 on cpu-shadow (staged all-reduce) equals one cpu rank bit for bit"
fi

# (d) no GPU here (or a build without CUDA): a clear error, exit 1
if "$MOET" info configs/tiny-moe.ini >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null; then
    run 1 nogpu cuda
    if [[ $rc -eq 1 ]] && grep -q "device = cuda:.*device = cpu" "$tmp/err"; then
        ok "d: device = cuda without a GPU: exit 1, $(head -c 90 "$tmp/err")..."
    else
        bad "d: device = cuda without a GPU" "exit $rc, want 1 with the reason"
    fi
fi

finish
