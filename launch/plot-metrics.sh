#!/usr/bin/env bash
# Plots a run's loss curves: loss, ce and val_loss of RUN_DIR/metrics.jsonl against the step,
# into RUN_DIR/loss.png (gnuplot; awk reads the JSON lines, so neither jq nor Python is needed).
# Usage: bash launch/plot-metrics.sh RUN_DIR      (RUN_DIR = the run's checkpoint.dir)
set -euo pipefail

RUN=${1:?usage: bash launch/plot-metrics.sh RUN_DIR}
M=$RUN/metrics.jsonl
if [[ ! -f $M ]]; then
    echo "plot-metrics: $M not found (is $RUN a run's checkpoint.dir?)" >&2
    exit 1
fi
if ! command -v gnuplot >/dev/null; then
    echo "plot-metrics: gnuplot not found ---> HINT: bash launch/setup-deps.sh (gnuplot-nox)" >&2
    exit 1
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moet-plot.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# get(line, key): the number after "key": in a metrics line, "" if absent
awk -v train="$tmp/train.dat" -v val="$tmp/val.dat" '
function get(line, key,   r) {
    if (!match(line, "\"" key "\":[^,}]+")) return ""
    return substr(line, RSTART + length(key) + 3, RLENGTH - length(key) - 3)
}
{
    s = get($0, "step")
    if (s == "") next
    if ((l = get($0, "loss")) != "") print s, l, get($0, "ce") > train
    if ((v = get($0, "val_loss")) != "" && v != "null") print s, v > val
}' "$M"
touch "$tmp/train.dat" "$tmp/val.dat"

plots="'$tmp/train.dat' using 1:2 with lines lw 1.5 title 'loss', "
plots+="'$tmp/train.dat' using 1:3 with lines lw 1.5 title 'ce'"
[[ -s $tmp/val.dat ]] &&
    plots+=", '$tmp/val.dat' using 1:2 with linespoints pt 7 lw 2 title 'val_loss'"
gnuplot <<GP
set terminal pngcairo size 900,540 noenhanced
set output '$RUN/loss.png'
set title '$M'
set xlabel 'step'
set ylabel 'nats per token'
set grid
set key top right
plot $plots
GP
echo "plot-metrics: wrote $RUN/loss.png"
