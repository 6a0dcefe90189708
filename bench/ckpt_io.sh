#!/usr/bin/env bash
# Checkpoint write and read throughput against `dd` on the same disk, in one run.
#   bash bench/ckpt_io.sh [MOET] [CONFIG] [DIR]
# (defaults build/moet, configs/bench-cpu-moe.ini, /tmp/moet-ckpt-io; DIR must be on the disk
# to measure). Trains 1 step of CONFIG with a full checkpoint (weights + AdamW moments), whose
# write the trainer times (HDF5 to a temporary file, fsync, rename); then `dd` writes the same
# number of bytes with conv=fdatasync (the same durability). Reading: `moet inspect --verify`
# (every dataset read and its CRC32 checked) against `dd` reading the file, both after dropping
# the page cache when this process may (root, /proc/sys/vm/drop_caches writable), else from the
# page cache (said in the output). Needs the sample shards (data/sample/tokens: launch/demo.sh).
# WARM_GB (default 8) GB of page cache are written and dropped first: on a VM whose memory the
# host backs lazily (this project's Firecracker VMs), the first touch of every guest page is
# slow, and without this whichever program runs first pays for it (a plain pwrite loop:
# 0.66 GB/s on the first run, 4.2 GB/s on the second).
set -euo pipefail
MOET=${1:-build/moet}
CONFIG=${2:-configs/bench-cpu-moe.ini}
DIR=${3:-/tmp/moet-ckpt-io}
rm -rf "$DIR"
mkdir -p "$DIR"
now() { date +%s.%N; }
dd if=/dev/zero of="$DIR/warm" bs=64M count=$((${WARM_GB:-8} * 16)) status=none
rm -f "$DIR/warm"
sync
drop() { sync; if [[ -w /proc/sys/vm/drop_caches ]] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then echo cold; else echo "page cache"; fi; }

echo "== $MOET train --config $CONFIG (1 step, checkpoint into $DIR/run)"
line=$("$MOET" train --config "$CONFIG" --set train.max_steps=1 --set checkpoint.every=1 \
    --set train.eval_every=0 --set "data.train=data/sample/tokens/train/*.npy" \
    --set checkpoint.dir="$DIR/run" | grep "^checkpoint")
echo "$line"
ck=$(readlink -f "$DIR/run/latest.h5")
bytes=$(stat -c %s "$ck")
moet_w=$(sed -E 's/.*: ([0-9.]+) GB\/s.*/\1/' <<<"$line")

blocks=$(( (bytes + 16777215) / 16777216 ))
t0=$(now); dd if=/dev/zero of="$DIR/dd.bin" bs=16M count=$blocks conv=fdatasync status=none; t1=$(now)
dd_w=$(awk -v b=$((blocks * 16777216)) -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.2f", b / 1e9 / (t1 - t0) }')

state=$(drop)
t0=$(now); "$MOET" inspect "$ck" --verify >/dev/null; t1=$(now)
moet_r=$(awk -v b="$bytes" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.2f", b / 1e9 / (t1 - t0) }')
drop >/dev/null
t0=$(now); dd if="$ck" of=/dev/null bs=16M status=none; t1=$(now)
dd_r=$(awk -v b="$bytes" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.2f", b / 1e9 / (t1 - t0) }')

echo
echo "checkpoint $ck: $(awk -v b="$bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }'); reads from the $state"
echo "| | moet GB/s | dd GB/s | moet / dd |"
echo "|---|---|---|---|"
awk -v m="$moet_w" -v d="$dd_w" 'BEGIN { printf "| write (fsync) | %s | %s | %.0f%% |\n", m, d, 100 * m / d }'
awk -v m="$moet_r" -v d="$dd_r" 'BEGIN { printf "| read (all CRCs checked) | %s | %s | %.0f%% |\n", m, d, 100 * m / d }'
rm -rf "$DIR"
