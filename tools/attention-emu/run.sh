#!/usr/bin/env bash
# Builds and runs a CPU emulation check of a kernel file (needs only g++):
#   tools/attention-emu/run.sh [quick|full] [order: 0 forward | 1 reverse | 2 random] [seed]
#                                                      kernels/attention.cu (attention_emu.cpp)
#   tools/attention-emu/run.sh risk|xent|sample [order] kernels/<name>.cu (<name>_emu.cpp)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
check=attention
case "${1:-}" in
    risk | xent | sample) check="$1"; shift ;;
esac
exe="${TMPDIR:-/tmp}/dfpo-$check-emu"
g++ -std=c++17 -O2 -g -fno-strict-aliasing -ffp-contract=off -U_FORTIFY_SOURCE -Wall -Wno-unused-function \
    -Wno-unknown-pragmas -I"$here/include" \
    -o "$exe" "$here/${check}_emu.cpp"
exec "$exe" "$@"
