# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test bench report clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned (a bare torch would pull a multi-GB CUDA build), then the package with
# the extras the target needs, torch held by constraints.txt: `demo` (Pillow) for make demo;
# `test` and `hf` (transformers, for the integration's tests) for make test.
$(STAMP): $(BIN)/python pyproject.toml setup.py CMakeLists.txt constraints.txt $(wildcard csrc/*)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,hf]' -c constraints.txt
	touch $@ $(DEMO_STAMP)

$(DEMO_STAMP): $(BIN)/python pyproject.toml setup.py CMakeLists.txt constraints.txt $(wildcard csrc/*)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[demo]' -c constraints.txt
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/python examples/demo/demo.py --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only

report: $(STAMP)
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf build demo_out .pytest_cache .benchmarks d2pruner_kernels/_C*.so $(STAMP) $(DEMO_STAMP)
