# make test | demo | bench | info: each creates .venv, installs the pinned dependencies and builds the
# extension first; a second run rebuilds nothing unless requirements, setup files or csrc/ changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
# Written by every build of the extension (setup.py), so it doubles as the build stamp.
EXT    := stabkernels/_C_build.json
CSRC   := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: test demo bench bench-pytest info clean

test: $(EXT)
	STABKERNELS_REQUIRE_EXT=1 $(BIN)/python -m pytest -q tests

demo: $(EXT)
	$(BIN)/python -m stabkernels demo $(ARGS)

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
	rm -rf build *.egg-info stabkernels/_C*.so $(EXT)
