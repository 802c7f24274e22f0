# The two commands of the README: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch must come first: a plain `torch` requirement would otherwise pull a CUDA build of several GB.
TORCH := torch==2.13.0

.PHONY: install install-test demo test lint bench clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install -e .

install-test: install
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) scripts/make_demo_checkpoint.py build/demo-llama
	$(PYTHON) -m precompute_cli convert build/demo-llama build/demo-llama-precomputed --overwrite
	$(PYTHON) -m precompute_cli inspect build/demo-llama-precomputed
	ls -l build/demo-llama-precomputed

test: install-test
	$(PYTHON) -m ruff check precompute_cli tests scripts
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check precompute_cli tests scripts

# Both tables of docs/BENCHMARKS.md (about 15 minutes on 2 cores); `make bench BENCH_FLAGS=--quick` for a smoke run.
BENCH_FLAGS ?=
bench: install-test
	$(PYTHON) scripts/bench_convert.py $(BENCH_FLAGS)
	$(PYTHON) scripts/bench_decode.py $(BENCH_FLAGS)

clean:
	rm -rf build .pytest_cache
