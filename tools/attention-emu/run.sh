#!/usr/bin/env bash
# Builds and runs the CPU emulation check of kernels/attention.cu (needs only g++):
#   tools/attention-emu/run.sh [quick|full] [order: 0 forward | 1 reverse | 2 random] [seed]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exe="${TMPDIR:-/tmp}/dfpo-attention-emu"
g++ -std=c++17 -O2 -g -fno-strict-aliasing -U_FORTIFY_SOURCE -Wall -Wno-unused-function -Wno-unknown-pragmas \
    -o "$exe" "$here/attention_emu.cpp"
exec "$exe" "$@"
