#!/usr/bin/env bash
# Launches `moet train` on several ranks with Open MPI: one rank per GPU (or per CPU socket).
#   launch/mpirun.sh -n RANKS [-H HOSTFILE] [-p RANKS_PER_NODE] [-t THREADS] -- TRAIN ARGS...
# e.g. launch/mpirun.sh -n 2 -t 1 -- --config configs/tiny-moe.ini
#      launch/mpirun.sh -n 16 -H hosts.txt -p 8 -- --config configs/olmoe-1b-7b.ini --resume latest
# The hostfile lists one node a line ("node01 slots=8"). Every rank must see the same repository
# path, data and checkpoint.dir (a shared file system). Extra mpirun options: MPIRUN_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
n=1 hostfile= per_node= threads=${OMP_NUM_THREADS:-}
while [[ $# -gt 0 ]]; do
  case $1 in
    -n) n=$2; shift 2 ;;
    -H) hostfile=$2; shift 2 ;;
    -p) per_node=$2; shift 2 ;;
    -t) threads=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "mpirun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "mpirun.sh: give the moet train arguments after --" >&2; exit 2; }
args=(-np "$n" --bind-to none)
[[ -n $hostfile ]] && args+=(--hostfile "$hostfile")
[[ -n $per_node ]] && args+=(--map-by "ppr:${per_node}:node")
# threads per rank: the cores of a node divided among its ranks unless given
if [[ -z $threads ]]; then
  ranks_here=${per_node:-$n}
  threads=$(( $(nproc) / ranks_here )); [[ $threads -ge 1 ]] || threads=1
fi
args+=(-x OMP_NUM_THREADS="$threads" -x OMP_WAIT_POLICY=PASSIVE)
[[ $(id -u) -eq 0 ]] && args+=(--allow-run-as-root)
[[ $n -gt $(nproc) && -z $hostfile ]] && args+=(--oversubscribe)
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} build/moet train "$@"
