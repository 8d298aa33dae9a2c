# make test | demo | bench | info: each creates .venv, installs the pinned dependencies and builds the
# extension first; a second run rebuilds nothing unless requirements, setup files or csrc/ changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
# Written by every build of the extension (setup.py), so it doubles as the build stamp.
EXT    := stabkernels/_C_build.json
CSRC   := $(shell find csrc -type f) setup.py pyproject.toml

# The CUDA build check (no GPU needed): a second venv with a CUDA torch builds the whole extension with CUDA
# kernels in a copy of the tracked tree (its _C would otherwise replace the CPU one), checks that `info`
# reports them, and runs the CPU suite under that torch (less the slow end-to-end runs of demo, bench and
# examples, which `make test` runs; CI's time).
# The torch is the OLDEST supported one (docs/install.md: torch 2.11-2.14), a CUDA 13 build like the GPU machine's
# 2.11.0+cu130; `make test` covers a newer torch (2.13). Its triton is the one torch pins (2.11: triton 3.6.0,
# the oldest supported and the GPU machine's), not requirements-dev.txt's, so the suite's Triton tests run under
# triton 3.6 here. Override for another torch: make test-cuda-build CUDA_TORCH=torch==2.14.1
CUDA_TORCH ?= torch==2.11.*
# triton 3.6's interpreter (the CPU runs of the Triton tests) converts one-element arrays with int(), which
# NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"): with requirements-dev.txt's
# numpy 2.4.6, 86 Triton tests fail under triton 3.6; with 2.3 none do (measured).
CUDA_NUMPY ?= numpy==2.3.*
CUDA_VENV  := .venv-cuda
CUDA_TREE  := .cuda-tree
CUDA_ARCH  ?= 9.0

# The GPU checks that need no GPU (tools/gpu_static_check.py): every Triton launch the Triton-backend tests make,
# AOT-compiled for sm_80/90/100 under the newest (the venv's) and the oldest supported triton (installed beside it),
# and every csrc/cuda kernel through ptxas -v with torch's nvcc flags (the CUDA venv's torch when there is one);
# fails on compile errors, spills outside an allow-list, shared memory over budget, fma in the bit-exact stream
# kernels, TF32/MMA in IEEE kernels. Results in build/gpu-static/ (not tracked).
TRITON_OLDEST     := 3.6.0
TRITON_OLDEST_DIR := build/triton-$(TRITON_OLDEST)
GPU_STATIC_OUT    := build/gpu-static

.PHONY: test test-cuda-build gpu-static-check demo bench bench-pytest info gpu-check clean

test: $(EXT)
	STABKERNELS_REQUIRE_EXT=1 $(BIN)/python -m pytest -q --durations=15 tests

test-cuda-build:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	grep -v '^torch==\|^triton==\|^numpy==' requirements-dev.txt > $(CUDA_VENV)/requirements.txt
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" "$(CUDA_NUMPY)" -r $(CUDA_VENV)/requirements.txt
	rm -rf $(CUDA_TREE) && mkdir $(CUDA_TREE)
	git ls-files -z | xargs -0 tar -cf - | tar -xf - -C $(CUDA_TREE)
	cd $(CUDA_TREE) && STABKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH)" MAX_JOBS=$$(nproc) CXXFLAGS=-g0 \
		../$(CUDA_VENV)/bin/python setup.py -q build_ext --inplace
	cd $(CUDA_TREE) && ../$(CUDA_VENV)/bin/python -m stabkernels info | tee info.txt
	grep -q "CUDA kernels: yes" $(CUDA_TREE)/info.txt
	cd $(CUDA_TREE) && STABKERNELS_REQUIRE_EXT=1 STABKERNELS_REQUIRE_CUDA_BUILD=1 \
		../$(CUDA_VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15 -m "not slow" tests

gpu-static-check: $(EXT) $(TRITON_OLDEST_DIR)/.installed
	$(BIN)/python tools/gpu_static_check.py check --out $(GPU_STATIC_OUT) --triton-path $(TRITON_OLDEST_DIR) \
		--cuda-python $(CUDA_VENV)/bin/python $(ARGS)

$(TRITON_OLDEST_DIR)/.installed: | $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps --target $(TRITON_OLDEST_DIR) "triton==$(TRITON_OLDEST)"
	touch $@

# On a machine with an NVIDIA GPU and torch, triton and a CUDA toolkit preinstalled (no network, no venv):
# builds in place, runs every CUDA/Triton test, the GPU benchmark and the sync/graph checks within about 8
# minutes, every result file under OUT (default bench/results; bench/gpu_check.sh, docs/gpu.md "Verify on your GPU").
# Without a GPU: one line, exit 0.
gpu-check:
	@OUT="$(OUT)" bash bench/gpu_check.sh

demo: $(EXT)
	$(BIN)/python -m stabkernels demo --scenario all $(ARGS)

bench: $(EXT)
	$(BIN)/python -m stabkernels bench $(ARGS)

bench-pytest: $(EXT)
	$(BIN)/python -m pytest bench --benchmark-only $(ARGS)

info: $(EXT)
	$(BIN)/python -m stabkernels info

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

$(EXT): $(DEPS) $(CSRC)
	CXXFLAGS="-g0 $(CXXFLAGS)" $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	test -f $@

clean:
	rm -rf build *.egg-info stabkernels/_C*.so $(EXT) $(CUDA_TREE)
