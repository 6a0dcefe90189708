#!/usr/bin/env bash
# Installs the Debian packages that moet's build and tests need, if any is missing.
# Idempotent and non-interactive. Without root it prints the apt-get line and exits 1.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libopenmpi-dev openmpi-bin          # MPI (launch, expert parallel all-to-all on CPU)
  libhdf5-openmpi-dev                 # parallel HDF5 (checkpoints)
  hdf5-tools                          # h5dump / h5ls: look inside checkpoints by hand
  libopenblas-openmp-dev              # sgemm (OpenMP build: no oversubscription in our loops)
  libdnnl-dev                         # oneDNN: bf16 GEMMs on AVX512-BF16 CPUs (precision = bf16)
  libcunit1-dev                       # unit tests
  libinih-dev libcjson-dev            # INI configs, JSON (Dolma documents, HF files)
  zlib1g-dev libzstd-dev zstd         # .gz / .zst documents (the zstd tool: tokenize tests)
  libonig-dev                         # Oniguruma regex (HF tokenizers' pre-tokenizer engine)
  libutf8proc-dev                     # Unicode NFC and categories (tokenizer)
  gnuplot-nox                         # launch/plot-metrics.sh: loss curves as PNG
)

missing=()
for p in "${PACKAGES[@]}"; do
  # "install ok installed" only for packages that are fully installed
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-deps: missing packages: ${missing[*]}" >&2
  echo "setup-deps: run as root:  apt-get update && $cmd" >&2
  exit 1
fi
echo "setup-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends ${missing[*]}
echo "setup-deps: done"
