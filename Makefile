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

# Until the trained demo model is bundled, `make run` shows the pipeline on a random-weight model.
RANDOM_DEMO := .scratch/random-small4-q8_0.gguf

$(RANDOM_DEMO): $(STAMP)
	mkdir -p .scratch
	$(BIN)/python -m convert.synthetic $(RANDOM_DEMO)

run: $(STAMP) $(RANDOM_DEMO)
	@echo "(random weights: the text is gibberish; it shows conversion, routing and decoding working)"
	$(BIN)/localmoe run -m $(RANDOM_DEMO) "The capital of France is" --max-tokens 24 --verbose

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python bench/bench_kernels.py --threads 2
	$(BIN)/python bench/bench_cpu.py --threads 2 --write docs/PERFORMANCE.md

clean:
	rm -rf $(VENV) .numba_cache build *.egg-info
