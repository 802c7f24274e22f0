# The two commands of the README: `make demo` and `make test`. Each installs what it needs first.
#
# Every target runs in one Python environment: PYTHON=... when given, else the active virtual environment
# (VIRTUAL_ENV), else .venv here, made on first use with the python3 on PATH (SYSTEM_PYTHON=... picks another).
# A system Python is never installed into: Debian's and Ubuntu's refuse it (PEP 668).
SYSTEM_PYTHON ?= python3
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
  ifdef VIRTUAL_ENV
    PYTHON := $(VIRTUAL_ENV)/bin/python
  else
    PYTHON := $(VENV)/bin/python
    READY := $(VENV)/.ready
  endif
endif
PIP := $(PYTHON) -m pip
# The runtime extra (load_model, verify, the tests) needs torch; converting does not. Its CPU build goes in first:
# on Linux PyPI's torch is a CUDA build of several GB, and PyTorch's CPU index has the same version as +cpu, which
# pip prefers. TORCH_INDEX=auto (the default) adds that index when it answers, and otherwise says so and leaves
# pip to its own configuration (on the project's machines, which cannot reach it, that finds the CPU build on
# local disk); TORCH_INDEX="--index-url URL" or TORCH_INDEX= (PyPI alone) choose yourself.
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= auto
# $(call install_torch,PYTHON): install $(TORCH) into that environment unless it already has a torch.
define install_torch
$(1) -c "import torch" 2>/dev/null || { \
  index='$(TORCH_INDEX)'; \
  if [ "$$index" = auto ]; then \
    if $(1) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=15)" 2>/dev/null; then \
      index="--extra-index-url $(TORCH_CPU_INDEX)"; \
    else \
      echo "$(TORCH_CPU_INDEX) cannot be reached: torch comes from pip's own configuration"; index=; \
    fi; \
  fi; \
  echo "$(1) -m pip install $(TORCH) $$index"; \
  $(1) -m pip install $(PIP_FLAGS) $(TORCH) $$index; }
endef
# Extra flags for every pip install (e.g. PIP_FLAGS=--quiet).
PIP_FLAGS ?=

.PHONY: install install-runtime install-test demo test lint pytest test-no-torch test-floors bench clean

$(VENV)/.ready:
	$(SYSTEM_PYTHON) scripts/make_venv.py $(VENV)

# The base install: convert and inspect (numpy, no torch).
install: $(READY)
	$(PIP) install $(PIP_FLAGS) -e .

install-runtime: install
	@$(call install_torch,$(PYTHON))
	$(PIP) install $(PIP_FLAGS) -e ".[runtime]"

install-test: install-runtime
	$(PIP) install $(PIP_FLAGS) -e ".[test]"

demo: install
	$(PYTHON) scripts/make_demo_checkpoint.py build/demo-llama
	$(PYTHON) -m precompute_cli convert build/demo-llama build/demo-llama-precomputed --overwrite
	$(PYTHON) -m precompute_cli inspect build/demo-llama-precomputed
	ls -l build/demo-llama-precomputed

test: lint pytest test-no-torch

lint: install-test
	$(PYTHON) -m ruff check precompute_cli tests scripts

# pytest exits 5 when it collected no test: that fails here like any other non-zero exit.
pytest: install-test
	$(PYTHON) -m pytest -q

# The base install in an environment of its own, without torch: convert and inspect the demo checkpoint there.
NO_TORCH_VENV := build/venv-no-torch
test-no-torch:
	$(SYSTEM_PYTHON) scripts/make_venv.py $(NO_TORCH_VENV)
	$(NO_TORCH_VENV)/bin/python -m pip install $(PIP_FLAGS) --quiet .
	! $(NO_TORCH_VENV)/bin/python -c "import torch" 2>/dev/null
	rm -rf build/no-torch && mkdir -p build/no-torch
	$(NO_TORCH_VENV)/bin/python scripts/make_demo_checkpoint.py build/no-torch/demo
	$(NO_TORCH_VENV)/bin/precompute convert build/no-torch/demo build/no-torch/out
	$(NO_TORCH_VENV)/bin/precompute inspect --check build/no-torch/out
	$(NO_TORCH_VENV)/bin/python -c "import sys, precompute_cli.cli; assert 'torch' not in sys.modules"

# The lowest versions pyproject.toml allows, in environments of their own: first the base install alone (no
# torch: convert and inspect), then with the runtime and test extras (torch excepted: its CPU build) under the
# whole suite. A floor that is not true fails here.
FLOORS_VENV := build/venv-floors
test-floors:
	$(SYSTEM_PYTHON) scripts/make_venv.py $(FLOORS_VENV)-base
	$(FLOORS_VENV)-base/bin/python scripts/lowest_requirements.py > build/floors-base.txt
	cat build/floors-base.txt
	$(FLOORS_VENV)-base/bin/python -m pip install $(PIP_FLAGS) -r build/floors-base.txt
	$(FLOORS_VENV)-base/bin/python -m pip install $(PIP_FLAGS) --no-deps .
	$(FLOORS_VENV)-base/bin/python -m pip check
	! $(FLOORS_VENV)-base/bin/python -c "import torch" 2>/dev/null
	rm -rf build/floors-demo && mkdir -p build/floors-demo
	$(FLOORS_VENV)-base/bin/python scripts/make_demo_checkpoint.py build/floors-demo/src
	$(FLOORS_VENV)-base/bin/precompute --help
	$(FLOORS_VENV)-base/bin/precompute convert build/floors-demo/src build/floors-demo/out
	$(FLOORS_VENV)-base/bin/precompute inspect --check build/floors-demo/out
	$(SYSTEM_PYTHON) scripts/make_venv.py $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python scripts/lowest_requirements.py runtime test > build/floors.txt
	cat build/floors.txt
	@$(call install_torch,$(FLOORS_VENV)/bin/python)
	$(FLOORS_VENV)/bin/python -m pip install $(PIP_FLAGS) -r build/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install $(PIP_FLAGS) --no-deps -e .
	$(FLOORS_VENV)/bin/python -m pip check
	$(FLOORS_VENV)/bin/python -m pip freeze
	$(FLOORS_VENV)/bin/python -m pytest -q

# Both tables of docs/BENCHMARKS.md (about 15 minutes on 2 cores); `make bench BENCH_FLAGS=--quick` for a smoke run.
BENCH_FLAGS ?=
bench: install-test
	$(PYTHON) scripts/bench_convert.py $(BENCH_FLAGS)
	$(PYTHON) scripts/bench_decode.py $(BENCH_FLAGS)

clean:
	rm -rf build .pytest_cache
