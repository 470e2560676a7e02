#!/usr/bin/env bash
# `make gpu-check`: everything that needs an NVIDIA GPU, in one command, results in bench/results/gpu/.
#
#  1. builds the extension in place (build/gpu -> pycosdist/_C*.so) with TORCH_CUDA_ARCH_LIST set to
#     the GPU's compute capability (e.g. 9.0 on an H100; set TORCH_CUDA_ARCH_LIST to override);
#  2. compute-sanitizer --tool memcheck over the biggest / hardest cases of tests/library/test_cuda.py
#     (PyTorch's caching allocator off, so an out-of-bounds access hits unallocated memory);
#  3. the whole tests/library/test_cuda.py;
#  4. bench/library/bench_cuda.py (cosine fwd+bwd and fused LIB vs torch.compile and a copy ceiling);
#  5. bench/denoise/bench_gpu_distill.py (a few hundred bf16-autocast distillation steps, fused KD vs
#     the compiled reference, and the CPU's throughput on the same step).
# Every step runs even if an earlier one failed (except the build); the exit status is non-zero if any
# failed; bench/results/gpu/summary.txt lists them with the device, driver, torch and CUDA versions.
#
# Expects, offline: an NVIDIA GPU with its driver (nvidia-smi), the CUDA toolkit (nvcc, compute-sanitizer)
# on PATH or in /usr/local/cuda/bin, and $PYTHON (default python3) with a CUDA build of torch, cmake,
# ninja, pybind11, pytest, hypothesis and numpy. Nothing is downloaded; pesq / pystoi / soundfile are
# not needed. Without a GPU it stops at once with a message and exit status 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=bench/results/gpu
export PATH="$PATH:/usr/local/cuda/bin"

die() { echo "gpu-check: $*" >&2; exit 1; }

# ---- 0. is there a GPU, and a torch that can use it? ----
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU' \
  || die "no NVIDIA GPU found (nvidia-smi missing or lists no GPU): this check needs a machine with one; nothing was run."
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null \
  || die "$PY has no CUDA-enabled torch that sees the GPU (torch.version.cuda / torch.cuda.is_available()); set PYTHON to one that does."
command -v nvcc >/dev/null 2>&1 || die "nvcc not found (PATH or /usr/local/cuda/bin): the CUDA kernels cannot be built."

mkdir -p "$OUT"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'n/a (not a git checkout)')"
  echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
  echo "compute capability: $arch; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  "$PY" -c "import sys, torch; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}')"
  echo "nvcc: $(nvcc --version | tail -n 1)"
  echo "compute-sanitizer: $(compute-sanitizer --version 2>/dev/null | tail -n 1 || echo missing)"
} >"$OUT/environment.txt"
cat "$OUT/environment.txt"

status=0
: >"$OUT/summary.txt"
step() {  # step NAME LOG COMMAND...: runs COMMAND, output to the terminal and to $OUT/LOG
  local name=$1 log=$2
  shift 2
  echo; echo "==== gpu-check: $name ===="
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  local line="$name: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s, log $OUT/$log"
  echo "$line" | tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || status=1
  return "$rc"
}

# ---- 1. build ----
build() {
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_BUILD_TYPE=Release \
    -DPYCOSDIST_WITH_CUDA=ON && cmake --build build/gpu --parallel \
  && PYTHONPATH=. "$PY" -c "import pycosdist, sys; info = pycosdist.build_info(); print(info); sys.exit(0 if info['with_cuda'] else 1)"
}
step build build.log build || die "the build failed (see $OUT/build.log); nothing else was run."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# ---- 2. memcheck on the hard cases ----
MEMCHECK_K="large_rows or 100000x64 or 70000x2x3 or 70000x3 or misaligned or with_grad or odd_and_wide or many_rows or scale_grad"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider tests/library/test_cuda.py -k "$MEMCHECK_K"
else
  echo "memcheck: FAILED (compute-sanitizer not found)" | tee -a "$OUT/summary.txt"
  status=1
fi

# ---- 3. all CUDA tests ----
step tests test_cuda.log "$PY" -m pytest -q -p no:cacheprovider -rs tests/library/test_cuda.py

# ---- 4. kernel benchmark ----
step bench_cuda bench_cuda.log "$PY" bench/library/bench_cuda.py --out-dir "$OUT"

# ---- 5. distillation on the GPU vs the CPU ----
step distill distill.log "$PY" bench/denoise/bench_gpu_distill.py --steps "${DISTILL_STEPS:-600}" --out-dir "$OUT"

echo
cat "$OUT/summary.txt"
[ $status = 0 ] && echo "gpu-check: OK (results in $OUT/)" || echo "gpu-check: FAILED (see $OUT/summary.txt)"
exit $status
