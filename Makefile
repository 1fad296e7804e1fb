# The two commands of the README, each doing its own set-up:
#
#   make demo   # the main job: train every estimator and the baselines on DC2, print the table, write plots
#   make test   # the test suite
#
# Both create (or reuse) .venv and install what is missing first; a second run starts at once.
# Prerequisite: Python >= 3.11 as `python3` (or PYTHON=/path/to/python3.x).
#
# PyTorch: CPU build by default (TORCH=cpu). TORCH=cuda installs the CUDA build from the package index
# (Linux x86_64). To switch an existing .venv, run `make clean-venv` first.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= out/dc2
PYTEST_ARGS ?= -q

BIN := $(VENV)/bin
STAMP := $(VENV)/.deepz-installed

.PHONY: demo test venv clean-venv

demo: $(STAMP)
	$(BIN)/deepz-compare --data dc2 --estimators all --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

# Re-installs when pyproject.toml changes (new dependencies); otherwise nothing to do.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	    { echo "pz-rail-deepz needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1). Use PYTHON=python3.11 (or newer)." >&2; exit 1; }
	@test -x $(BIN)/python || { echo "[make] creating $(VENV) with $$($(PYTHON) --version 2>&1)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, so that the package's torch==$(TORCH_VERSION) pin is already met: from the package index a
	@# plain 'torch==$(TORCH_VERSION)' is the multi-GB CUDA build on Linux x86_64; the CPU build carries '+cpu'
	@# (a higher version for pip) and lives on PyTorch's CPU index.
	@if [ "$(TORCH)" = "cuda" ]; then \
	    echo "[make] installing torch==$(TORCH_VERSION) (CUDA build from the package index)"; \
	    $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	elif [ "$(TORCH)" = "cpu" ]; then \
	    if $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" 2>/dev/null; then \
	        echo "[make] installing torch==$(TORCH_VERSION) (CPU build, from $(TORCH_CPU_INDEX))"; \
	        $(BIN)/python -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"; \
	    else \
	        echo "[make] $(TORCH_CPU_INDEX) is not reachable: torch==$(TORCH_VERSION) from the configured package index"; \
	        $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	    fi; \
	else echo "TORCH must be cpu or cuda, got '$(TORCH)'" >&2; exit 1; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@$(BIN)/python -c 'import torch; print("[make] torch", torch.__version__, "CUDA build" if torch.version.cuda else "CPU build")'
	@if [ "$(TORCH)" = "cpu" ] && $(BIN)/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then \
	    echo "[make] WARNING: TORCH=cpu but the package index gave a CUDA build of torch (it runs on the CPU too, but is several GB)." >&2; fi
	@touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
