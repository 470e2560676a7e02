# `make demo` and `make test` set everything up from nothing (.venv, torch 2.13.0 CPU, deps, build).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
# Build requirements, installed before the --no-build-isolation install (never torch in isolation).
# Cython, setuptools and numpy are there for pesq's sdist (the [train] extra), as in README.
BUILD_DEPS := scikit-build-core pybind11 ninja Cython setuptools numpy

.PHONY: demo test build docs dev bench cuda-check gpu-check clean

$(DEPS):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q $(BUILD_DEPS)
	touch $@

# Installs the package with every extra into .venv, building the extension against the venv's torch.
build: $(DEPS)
	$(VPY) -m pip install -q --no-build-isolation ".[all]"

# Debian packages of recorded sound the demo uses when it can install them (as root): real voices
# (ktuberling-data, GPL-2+) for the real-speech tables, held-out recorded ambiences (wesnoth-1.16-data)
# for the recorded-noise table, and small recorded-noise packages mixed into the students' training
# corpus (pycosdist.denoise.recorded_noise lists each one's license). Without them the demo skips those
# tables / trains on generated noise only, and says so.
DEMO_PACKAGES := ktuberling-data wesnoth-1.16-data lincity-ng-data freeciv-data sound-theme-freedesktop \
                 frozen-bubble-data hedgewars-data
demo: build
	@missing=$$(for p in $(DEMO_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq $$missing) >/dev/null 2>&1; } || \
	  echo "note: could not install $$missing; the demo leaves out what needs them"; fi
	$(VENV)/bin/pycosdist demo

# The test command (README, CI). Runs the installed package (tests/ is not a package, so the
# source tree does not shadow it).
test: build
	$(VENV)/bin/pytest -q tests

# The documentation site (mkdocs.yml, docs/) into build/site; --strict: any warning (a broken link or
# cross-reference, a missing page, an API object that cannot be found) fails. The [docs] extra is
# installed on top of the build (its own pip run: the tools stay out of [all]).
docs: build
	$(VPY) -m pip install -q --no-build-isolation ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict   # not python -m: the source tree must not shadow the build

# CPU benchmarks (our ops vs eager and torch.compile of the reference); CSVs in bench/results/.
bench: build
	$(VPY) bench/library/bench_cosine_distance.py
	$(VPY) bench/library/bench_lib.py
	$(VPY) bench/denoise/bench_train_step.py

# In-place developer build: pycosdist/_C*.so next to the sources; use with PYTHONPATH=.
dev: $(DEPS)
	cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE=$(abspath $(VPY)) -DCMAKE_BUILD_TYPE=Release
	cmake --build build/dev

# Compile-check every torch-free CUDA kernel with nvcc (sm_80, sm_90), registers and spills reported.
cuda-check:
	bash .ci/check_cuda_kernels.sh

# On a machine with an NVIDIA GPU and a CUDA torch ($(PYTHON)): build for its compute capability,
# compute-sanitizer memcheck, the CUDA tests, the CUDA benchmarks and a short bf16 distillation run;
# results in bench/results/gpu/ (scripts/gpu_check.sh). Without a GPU it stops at once (exit 1).
gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

clean:
	rm -rf build dist *.egg-info pycosdist/_C*.so pycosdist/_build_config.py
