# `make demo` and `make test` set everything up from nothing (.venv, torch 2.13.0 CPU, deps, build).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
# Runtime + build + test dependencies (torch pinned; never inside build isolation).
PIP_DEPS := numpy scipy threadpoolctl pybind11 scikit-build-core ninja pesq pystoi soundfile tqdm espeakng-loader \
            matplotlib pytest pytest-benchmark hypothesis onnx onnxruntime onnxscript

.PHONY: demo test build dev bench cuda-check clean

$(DEPS):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q $(PIP_DEPS)
	touch $@

# Installs the package into .venv, building the extension against the venv's torch.
build: $(DEPS)
	$(VPY) -m pip install -q --no-build-isolation .

demo: build
	$(VENV)/bin/pycosdist demo

# The test command (README, CI). Runs the installed package (tests/ is not a package, so the
# source tree does not shadow it).
test: build
	$(VENV)/bin/pytest -q tests

# CPU benchmarks (our ops vs eager and torch.compile of the reference); CSVs in bench/results/.
bench: build
	$(VPY) bench/bench_cosine_distance.py
	$(VPY) bench/bench_lib.py
	$(VPY) bench/bench_train_step.py

# In-place developer build: pycosdist/_C*.so next to the sources; use with PYTHONPATH=.
dev: $(DEPS)
	cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE=$(abspath $(VPY)) -DCMAKE_BUILD_TYPE=Release
	cmake --build build/dev

# Compile-check every torch-free CUDA kernel with nvcc (sm_80, sm_90), registers and spills reported.
cuda-check:
	bash .ci/check_cuda_kernels.sh

clean:
	rm -rf build dist *.egg-info pycosdist/_C*.so pycosdist/_build_config.py
