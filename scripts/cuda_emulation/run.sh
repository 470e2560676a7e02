#!/usr/bin/env bash
# Runs the CUDA kernels' logic on the CPU, without a GPU: each csrc/**/*_kernels.cu is turned into
# host C++ (kernel launches `k<<<grid, block, 0, stream>>>(...)` become emu::launch(grid, block, k, ...)),
# compiled with g++ against emu.h (a std::thread per CUDA thread, barriers for __syncthreads, per-warp
# slots for __shfl_xor_sync) and checked by kernels_test.cpp against float64 references.
# Not a substitute for `make gpu-check` (no real memory model, no timing), but it catches indexing,
# alignment-split, reduction and grid-planning errors. Takes ~15 min on 2 cores:
#   bash scripts/cuda_emulation/run.sh [SMS [quick]]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
for f in cosine_distance/cosine_distance_kernels lib_cosine_loss/lib_cosine_loss_kernels; do
  python3 - "$root/csrc/$f.cu" "$tmp/$(basename "$f").cpp" <<'PY'
import re, sys
s = open(sys.argv[1]).read()
s = re.sub(r"(\w+<[^<>]*>)<<<(.*?), 0, stream>>>\(", r"emu::launch(\2, \1, ", s, flags=re.S)
open(sys.argv[2], "w").write('#include "emu.h"\n' + s)
PY
done
g++ -std=c++20 -O1 -pthread -w -I "$root/csrc" -I "$here" -I "$tmp" -I "$cuda_inc" "$here/kernels_test.cpp" -o "$tmp/kernels_test"
"$tmp/kernels_test" "$@"
