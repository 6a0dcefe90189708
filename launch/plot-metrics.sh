#!/usr/bin/env bash
# Plots a run's curves and expert loads (gnuplot; awk reads the files, so neither jq nor Python
# is needed):
#   RUN_DIR/loss.png         loss, ce and val_loss of RUN_DIR/metrics.jsonl against the step
#   RUN_DIR/expert_load.png  (MoE runs) a heat map of RUN_DIR/expert_load.tsv: experts x steps,
#                            the colour each expert's load / the layer's mean load in that step
#                            (1 = balanced; K of E experts per token: at most E/K); all layers
#                            stacked, or the one --layer names
# Usage: bash launch/plot-metrics.sh RUN_DIR [--layer N]      (RUN_DIR = the run's checkpoint.dir)
set -euo pipefail

usage="usage: bash launch/plot-metrics.sh RUN_DIR [--layer N]"
RUN=${1:?$usage}
shift
LAYER=-1
while [[ $# -gt 0 ]]; do
    case $1 in
    --layer)
        if [[ $# -lt 2 || ! $2 =~ ^[0-9]+$ ]]; then
            echo "plot-metrics: --layer needs a layer number ($usage)" >&2
            exit 2
        fi
        LAYER=$2
        shift 2
        ;;
    *) echo "plot-metrics: unknown argument $1 ($usage)" >&2; exit 2 ;;
    esac
done
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

# ---- the expert-load heat map ----
T=$RUN/expert_load.tsv
if [[ ! -f $T ]]; then
    if [[ $LAYER -ge 0 ]]; then
        echo "plot-metrics: --layer $LAYER: $T not found (not an MoE run?)" >&2
        exit 1
    fi
    exit 0
fi
# expert_load.tsv: "step layer load_0 ... load_{E-1}" per logged step and layer. The image needs a
# regular grid: the steps on the run's logging stride (a last step off it is dropped), at most
# 2000 columns (every k-th step beyond that). Rows: layer * E + expert (stacked) or the expert.
# Writes "x y value" lines to heat.dat and "L E first last stride" to heat.info.
awk -F'\t' -v layer="$LAYER" -v dat="$tmp/heat.dat" -v info="$tmp/heat.info" '
/^#/ || NF < 3 { next }
{
    s = $1 + 0; l = $2 + 0; E = NF - 2
    if (!(s in seen)) { seen[s] = 1; steps[ns++] = s }
    if (l + 1 > L) L = l + 1
    row[s, l] = $0
}
END {
    if (ns == 0) exit 3
    if (layer >= L) exit 4
    # steps in order (insertion sort: resumed files are already ordered)
    for (i = 1; i < ns; i++) {
        v = steps[i]
        for (j = i - 1; j >= 0 && steps[j] > v; j--) steps[j + 1] = steps[j]
        steps[j + 1] = v
    }
    # the logging stride: the most frequent gap (the last step of a run, off the stride, is not)
    d = 1
    for (i = 1; i < ns; i++) gap[steps[i] - steps[i - 1]]++
    for (g in gap) if (gap[g] > gap[d] || (gap[g] == gap[d] && g + 0 > d)) d = g + 0
    n_on = 0
    for (i = 0; i < ns; i++) if (steps[i] % d == 0) n_on++
    if (n_on == 0) exit 3
    k = 1
    while (n_on / k > 2000) k++
    stride = d * k
    first = -1
    for (i = 0; i < ns; i++) {
        s = steps[i]
        if (s % d != 0 || (first >= 0 && (s - first) % stride != 0)) continue
        if (first < 0) first = s
        last = s
        for (l = 0; l < L; l++) {
            if (layer >= 0 && l != layer) continue
            if (!((s, l) in row)) continue
            split(row[s, l], f, "\t")
            sum = 0
            for (e = 0; e < E; e++) sum += f[e + 3]
            for (e = 0; e < E; e++) {
                y = layer >= 0 ? e : l * E + e
                print s, y, (sum > 0 ? f[e + 3] * E / sum : 0) > dat
            }
        }
    }
    print L, E, first, last, stride > info
}' "$T" || {
    rc=$?
    if [[ $rc -eq 4 ]]; then
        n=$(awk -F'\t' '!/^#/ && $2 + 1 > n { n = $2 + 1 } END { print n }' "$T")
        echo "plot-metrics: --layer $LAYER: the run has layers 0..$((n - 1))" >&2
        exit 2
    fi
    echo "plot-metrics: $T holds no loads yet" >&2
    exit 1
}
read -r L E first last stride <"$tmp/heat.info"
rows=$(( LAYER >= 0 ? E : L * E ))
height=$(( rows * 6 + 220 ))
(( height < 420 )) && height=420
(( height > 1600 )) && height=1600
if [[ $LAYER -ge 0 ]]; then
    what="layer $LAYER"
    ylabel="expert"
    yset="set ytics autofreq"
else
    what="layers 0..$((L - 1)) stacked"
    ylabel="layer (experts 0..$((E - 1)) upwards)"
    tics=""
    sep=""
    for ((l = 0; l < L; l++)); do
        tics+="${tics:+, }\"$l\" $((l * E + E / 2))"
        y=$((l * E))
        ((l > 0)) &&
            sep+="set arrow from graph 0, first $y - 0.5 to graph 1, first $y - 0.5 nohead front"$'\n'
    done
    yset="set ytics ($tics)"$'\n'"$sep"
fi
gnuplot <<GP
set terminal pngcairo size 1000,$height noenhanced
set output '$RUN/expert_load.png'
set title '$T: $what, steps $first..$last every $stride'
set xlabel 'step'
set ylabel '$ylabel'
set cblabel 'load / mean load of the layer (1 = balanced)'
set palette defined (0 '#ffffff', 1 '#9ecae1', 2 '#fdae61', 4 '#a50026')
set cbrange [0:*]
set xrange [$first - $stride / 2.0 : $last + $stride / 2.0]
set yrange [-0.5 : $rows - 0.5]
$yset
plot '$tmp/heat.dat' using 1:2:3 with image notitle
GP
echo "plot-metrics: wrote $RUN/expert_load.png ($what)"
