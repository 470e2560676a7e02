#!/usr/bin/env bash
# `make gpu-check`: everything that needs an NVIDIA GPU, in one command, results in bench/results/gpu/.
#
#  1. builds the extension in place (build/gpu -> pycosdist/_C*.so) with TORCH_CUDA_ARCH_LIST set to
#     the GPU's compute capability (e.g. 9.0 on an H100; set TORCH_CUDA_ARCH_LIST to override);
#  2. compute-sanitizer --tool memcheck over the biggest / hardest cases of tests/library/test_cuda.py
#     (PyTorch's caching allocator off, so an out-of-bounds access hits unallocated memory);
#  3. the CUDA tests: tests/library/test_cuda.py, the LIB chunk policy on the device
#     (tests/library/test_lib_chunks.py: peak memory <= 25% of eager at N=65536, faked budgets) and
#     the static training steps (tests/denoise/test_graphed_step.py: CUDA graphs and compile);
#  4. bench/library/bench_cuda.py: cosine fwd+bwd (fp32, bf16) against the device copy bandwidth, and
#     the fused LIB loss (fp32, bf16 at N=65536, D_s=256, E=1024, D_t=512) vs torch.compile;
#  5. bench/denoise/bench_gpu_distill.py: bf16 distillation steps (batch 16): task only, the eager
#     fused KD step, the compiled-reference KD step, the fused step captured in one CUDA graph
#     (DISTILL_STATIC="graphs compile" adds torch.compile(mode="reduce-overhead"): a minute or two
#     more); and the loss curves of the static steps against the eager one over the first 100 steps
#     (it fails if they differ beyond bf16 tolerance);
#  6. the issue-22 bars from those results (bench/results/gpu/bars.txt), with the device name.
# Every step runs even if an earlier one failed (except the build); the exit status is non-zero if any
# failed or ran out of time; bench/results/gpu/summary.txt lists them with the device, driver, torch
# and CUDA versions. The whole run is held to GPU_CHECK_SECONDS (default 450 s: device time is
# short); a step that would start past it is reported as not run, and counts as a failure.
#
# Expects, offline: an NVIDIA GPU with its driver (nvidia-smi), the CUDA toolkit (nvcc, compute-sanitizer)
# on PATH or in /usr/local/cuda/bin, and $PYTHON (default python3) with a CUDA build of torch, cmake,
# ninja, pybind11, pytest, hypothesis and numpy. Nothing is downloaded; pesq / pystoi / soundfile are
# not needed. Without a GPU it stops at once with a message and exit status 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=bench/results/gpu
export PY OUT  # the step functions run in child shells (under timeout)
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
BUDGET=${GPU_CHECK_SECONDS:-450}
step() {  # step NAME LOG CAP COMMAND...: runs COMMAND for at most CAP s (and the time left), output to the terminal and $OUT/LOG
  local name=$1 log=$2 cap=$3
  shift 3
  echo; echo "==== gpu-check: $name ===="
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "$name: FAILED (not run: the ${BUDGET} s budget is spent)" | tee -a "$OUT/summary.txt"
    status=1
    return 1
  fi
  [ "$cap" -lt "$left" ] || cap=$left
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs it in a child bash
    local fn=$1
    set -- bash -c "$(declare -f "$fn"); $fn"
  fi
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "$name: timed out after $cap s" | tee -a "$OUT/$log"
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
step build build.log 240 build || die "the build failed (see $OUT/build.log); nothing else was run."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# ---- 2. memcheck on the hard cases ----
MEMCHECK_K="large_rows or 100000x64 or 70000x2x3 or 70000x3 or misaligned or with_grad or odd_and_wide or many_rows or scale_grad"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck memcheck.log 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider tests/library/test_cuda.py -k "$MEMCHECK_K"
else
  echo "memcheck: FAILED (compute-sanitizer not found)" | tee -a "$OUT/summary.txt"
  status=1
fi

# ---- 3. all CUDA tests ----
# (the compiled static step's curve is checked by step 5 on the real models: not twice)
step tests test_cuda.log 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/library/test_cuda.py \
  tests/library/test_lib_chunks.py tests/denoise/test_graphed_step.py \
  --deselect "tests/denoise/test_graphed_step.py::test_cuda_static_step_has_the_eager_loss_curve[compile]"

# ---- 4. kernel benchmark ----
step bench_cuda bench_cuda.log 90 "$PY" bench/library/bench_cuda.py --out-dir "$OUT"

# ---- 5. distillation on the GPU vs the CPU, and the static steps' loss curves ----
step distill distill.log 180 "$PY" bench/denoise/bench_gpu_distill.py --steps "${DISTILL_STEPS:-240}" --rounds 4 \
  --static ${DISTILL_STATIC:-graphs} --curve-steps 100 --out-dir "$OUT"

# ---- 6. the issue-22 bars, from the results above ----
bars() {
  "$PY" - "$OUT" <<'PY'
import csv, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
env = (out / "environment.txt").read_text()
device = next((l.split(":", 1)[1].strip() for l in env.splitlines() if l.startswith("gpu:")), "unknown GPU")
lines, missing = [f"device: {device}"], []
cuda = sorted(out.glob("cuda_*.csv"), key=lambda p: p.stat().st_mtime)
rows = list(csv.DictReader(cuda[-1].open())) if cuda else []
def lib(impl):
    return next((float(r["ms"]) for r in rows if r["bench"] == "lib" and r["dtype"] == "bfloat16" and r["impl"] == impl), None)
fused, comp = lib("pycosdist"), lib("compile")
cos = next((float(r["% copy"]) for r in rows if r["bench"] == "cosine" and r["dtype"] == "bfloat16"), None)
distill = out / "distill_cuda.json"
steps = {r["kd"]: r["steps/s"] for r in json.loads(distill.read_text())["rows"] if r["device"] == "cuda"} if distill.exists() else {}
curves = out / "distill_curves_cuda.json"
curve = json.loads(curves.read_text())["max relative difference"] if curves.exists() else {}
def bar(name, value, goal, text, at_most=False):
    if value is None:
        missing.append(name)
        lines.append(f"{name}: NO RESULT (its step failed)")
    else:
        met = value <= goal if at_most else value >= goal
        lines.append(f"{name}: {text} -> {'MET' if met else 'NOT MET'} (bar {'<=' if at_most else '>='} {goal:g})")
bar("fused LIB bf16 vs torch.compile", fused and comp and comp / fused, 2.0,
    f"{fused:.3f} ms vs {comp:.3f} ms = {comp / fused:.2f}x" if fused and comp else "")
g, e = steps.get("fused-graphs"), steps.get("fused")
bar("CUDA-graph step vs eager fused step", g and e and g / e, 3.0,
    f"{g:.1f} vs {e:.1f} steps/s = {g / e:.2f}x; loss curve max difference {curve.get('fused-graphs', float('nan')):.3g}" if g and e else "")
bar("cosine bf16, % of copy", cos, 85.0, f"{cos:.1f}% of copy" if cos is not None else "")
for dtype in ("float32", "bfloat16"):
    mem = next((float(r["peak % eager"]) for r in rows if r["bench"] == "lib" and r["dtype"] == dtype
                and r["impl"] == "pycosdist" and r.get("peak % eager")), None)
    bar(f"fused LIB {dtype} peak memory, % of eager", mem, 25.0, f"{mem:.1f}%" if mem is not None else "", at_most=True)
(out / "bars.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if missing else 0)
PY
}
step bars bars.log 30 bars

echo
cat "$OUT/summary.txt"
[ $status = 0 ] && echo "gpu-check: OK (results in $OUT/)" || echo "gpu-check: FAILED (see $OUT/summary.txt)"
exit $status
