# localmoe: setup, run, test, bench.  Everything runs inside .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export CMAKE_ARGS ?= -DGGML_NATIVE=ON
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The bundled demo model (localmoe/data/demo.gguf, docs/DEMO.md), its reasoning shown before the answer.
run: $(STAMP)
	$(BIN)/localmoe run --effort high --show-thinking --verbose "What is 47 + 385 - 129?"

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python bench/bench_kernels.py --threads 2
	$(BIN)/python bench/bench_cpu.py --threads 2 --write docs/PERFORMANCE.md

clean:
	rm -rf $(VENV) .numba_cache build *.egg-info
