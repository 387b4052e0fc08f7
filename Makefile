# opengem — build, demo, test, bench.
# `make demo` and `make test` create .venv through `make install` when missing.

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
VPY     := $(VENV)/bin/python
UV      := $(VENV)/bin/uv
UV_VERSION := 0.13.9
# ACCEL=cpu installs requirements/cpu.lock: torch 2.13.0+cpu, fbgemm-gpu-cpu,
# torchrec without its CUDA dependency. ACCEL=cuda installs requirements/cuda.lock
# (CUDA torch, fbgemm-gpu). Default: cuda where an NVIDIA driver answers, else cpu.
ACCEL   ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
LOCK    := requirements/$(ACCEL).lock
# Where the CPU torch wheel comes from: a local wheel folder (PIP_FIND_LINKS /
# UV_FIND_LINKS) when it holds torch 2.13.0+cpu, else the PyTorch CPU index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
FIND_LINKS  := $(firstword $(UV_FIND_LINKS) $(PIP_FIND_LINKS))
HAVE_LOCAL_TORCH := $(if $(FIND_LINKS),$(wildcard $(FIND_LINKS)/torch-2.13.0+cpu-*.whl))
ifeq ($(ACCEL),cpu)
  TORCH_SRC := $(if $(HAVE_LOCAL_TORCH),--find-links $(FIND_LINKS),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)
else
  TORCH_SRC :=
endif
PYTEST_ARGS ?=

.PHONY: install demo test test-integration test-slow test-all bench bench-full lock proto clean help

help:
	@echo "make demo | test | test-all | bench | install | lock | clean"

$(VENV)/.installed: pyproject.toml $(LOCK)
	@test -n "$(PYTHON)" || { echo "python3.11 not found"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "uv==$(UV_VERSION)"
	$(UV) pip sync --python $(VPY) $(TORCH_SRC) $(LOCK)
	$(UV) pip install --python $(VPY) --no-deps -e .
	$(VPY) -c "import torch, torchrec, fbgemm_gpu, triton, faust, rocksdict, pyarrow; print('opengem env ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/opengem demo

# The default test run: unit + integration (each integration test starts the
# embedded broker itself). Slow tests run in `make test-slow`.
test: install
	$(VPY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: install
	$(VPY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(VPY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# `make bench`: every benchmark in its --quick form (about a minute each; the same ratios on
# less data; JSON in bench/results/quick/, so the full runs' results stay). `make bench-full`:
# the full runs into bench/results/ (bench/model_quality.py alone takes hours on 2 cores).
bench: install
	@set -e; mkdir -p bench/results/quick; for b in bench/[!_]*.py; do n=$$(basename $$b .py); \
	  echo "== $$b --quick"; $(VPY) $$b --quick --out bench/results/quick/$$n.json; done

bench-full: install
	@set -e; for b in bench/[!_]*.py; do echo "== $$b"; $(VPY) $$b; done

# Re-resolve the locks after changing pyproject.toml.
lock: install
	$(UV) pip compile pyproject.toml --extra cpu --extra dev \
	  --override requirements/overrides-cpu.txt $(TORCH_SRC) \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements/cpu.lock
	$(UV) pip compile pyproject.toml --extra cuda --extra dev \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements/cuda.lock

# Regenerate serving/ranking_pb2{,_grpc}.py and .pyi from serving/ranking.proto
# (checked in). The repo root is the package `opengem`, so protoc runs on a
# symlink named opengem: generated imports are `from opengem.serving import …`.
proto: install
	@tmp=$$(mktemp -d) && ln -s "$(CURDIR)" $$tmp/opengem && \
	$(VPY) -m grpc_tools.protoc -I $$tmp --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp \
	  $$tmp/opengem/serving/ranking.proto; rc=$$?; rm -rf $$tmp; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
