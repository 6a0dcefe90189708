#!/usr/bin/env bash
# The demo: installs what is missing, builds moet, then shows the tiny MoE model that the tests
# and the demo use: its configuration and sizes (`moet info`) and a timed forward+backward
# (`moet bench`). (Training on the bundled data comes with the trainer.)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}

bash launch/setup-deps.sh
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" >/dev/null
echo "== $BUILD_DIR/moet info configs/tiny-moe.ini"
"$BUILD_DIR/moet" info configs/tiny-moe.ini | sed -n '/# parameters/,$p'
echo
echo "== $BUILD_DIR/moet info configs/olmoe-1b-7b.ini"
"$BUILD_DIR/moet" info configs/olmoe-1b-7b.ini | sed -n '/total parameters/,/training FLOPs/p'
echo
echo "== $BUILD_DIR/moet bench configs/tiny-moe.ini"
"$BUILD_DIR/moet" bench configs/tiny-moe.ini
