# gpu-common.bash: what launch/gpu-check.sh and launch/gpu-perf.sh share (sourced from the
# repository root, with the script's arguments):
#   source launch/gpu-common.bash [BUNDLE] [LOGDIR]
# BUNDLE is a folder from launch/gpu-bundle.sh (bin/, lib/), its .tar.gz (unpacked next to
# it), or a build folder (default gpu-bundle); LOGDIR receives one log per check (default
# gpu-logs). Sets BUNDLE, LOG, BIN (the executables), LD_LIBRARY_PATH (the bundle's lib/ first),
# OMP_NUM_THREADS (default 8) and fail = 0, defines check, and writes the GPU's name, driver
# and memory with the date to LOGDIR/gpu.txt and stdout.
#   check NAME COMMAND...   runs COMMAND (stopped after CHECK_TIMEOUT s, default 600) with its
#                           output in LOGDIR/NAME.log and prints one line: ok, SKIPPED (exit 77:
#                           no GPU) or FAILED (exit status); the last two count in $fail
BUNDLE=${1:-gpu-bundle}
LOG=${2:-gpu-logs}
mkdir -p "$LOG"
if [[ $BUNDLE == *.tar.gz ]]; then # packed by gpu-bundle.sh: unpack next to it
  tar xzf "$BUNDLE" -C "$(dirname "$BUNDLE")"
  BUNDLE=${BUNDLE%.tar.gz}
fi
BIN=$BUNDLE/bin
[ -d "$BIN" ] || BIN=$BUNDLE
export LD_LIBRARY_PATH="$(cd "$BUNDLE" && pwd)/lib:${LD_LIBRARY_PATH:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
fail=0
check() { # name, command...
  local name=$1; shift
  local t0=$SECONDS
  timeout "${CHECK_TIMEOUT:-600}" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  if [[ $rc -eq 0 ]]; then r=ok
  elif [[ $rc -eq 77 ]]; then r="SKIPPED (no GPU)"; fail=$((fail + 1))
  else r="FAILED ($rc)"; fail=$((fail + 1)); fi
  printf '%-34s %-12s %4ds  %s\n' "$name" "$r" $((SECONDS - t0)) "$LOG/$name.log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } \
  | tee "$LOG/gpu.txt"
