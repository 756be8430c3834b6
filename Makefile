# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
#
# Inside an active virtual environment they install into it; otherwise they create `.venv` in the repository
# and use it (so a system Python that refuses `pip install`, PEP 668, is never touched). Installing happens once
# and again only when pyproject.toml or setup.py change (a stamp file in the environment).
#
# torch is installed first when missing, pinned: on a machine that reaches only PyPI a bare `torch` requirement
# pulls several GB of CUDA wheels. Give PyTorch's own wheel index for a CPU-only or a CUDA build:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu126
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

# PYTHON=python3.13 on the command line gets an environment of its own (.venv-python3.13): an environment is
# never reused by another interpreter than the one that made it.
ifdef VIRTUAL_ENV
ENV := $(VIRTUAL_ENV)
else ifeq ($(origin PYTHON),command line)
ENV := .venv-$(notdir $(PYTHON))
else
ENV := .venv
endif
PY := $(ENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install demo test test-fast bench figures docs docs-serve gpu-check gpu-rehearse gpu-wheels gpu-data gpu-command

# the Pythons the package runs on (pyproject.toml's requires-python); checked before anything is installed
SUPPORTED = (3, 10) <= sys.version_info[:2] <= (3, 13)

# The interpreter $(1) names: itself when it runs; else, for a bare pythonX.Y (pyenv's shim of a version that is
# not active says "command not found"), the newest X.Y.* under `pyenv root`; else $(1) as given.
find_python = $(shell p='$(1)'; if "$$p" -c '' 2>/dev/null; then echo "$$p"; exit; fi; \
	case "$$p" in (python3.*) root=$$(pyenv root 2>/dev/null) && \
	for c in $$(ls -d "$$root"/versions/$(patsubst python%,%,$(1)).*/bin/$$p 2>/dev/null \
	| grep -E '/versions/[0-9.]+/bin/' | sort -rV); do "$$c" -c '' 2>/dev/null && { echo "$$c"; exit; }; done;; \
	esac; echo "$$p")

# one sentence and exit 2 unless the interpreter $(1) (named $(2)) runs and is Python 3.10 to 3.13
check_python = "$(1)" -c '' 2>/dev/null || { echo "$(2) does not run here (nor does pyenv hold it): give a \
	Python 3.10 to 3.13 with PYTHON=python3.12 or PYTHON=/path/to/python3.12." >&2; exit 2; }; \
	"$(1)" -c "import sys; sys.exit(not ($(SUPPORTED)))" || { echo "$(2) is Python \
	$$("$(1)" -c 'import platform; print(platform.python_version())'); esm_gearnet runs on Python 3.10 to 3.13: \
	give one with PYTHON=python3.12 (pyenv versions lists them)." >&2; exit 2; }

$(PY):
	@$(call check_python,$(call find_python,$(PYTHON)),$(PYTHON))
	$(call find_python,$(PYTHON)) -m venv $(ENV)

# checked again here, for an active environment or one made before the check: torch never goes into another
$(ENV)/.esm_gearnet-core: pyproject.toml setup.py | $(PY)
	@$(call check_python,$(PY),$(ENV))
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)" \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e .
	@touch $@

$(ENV)/.esm_gearnet-test: $(ENV)/.esm_gearnet-core
	$(PIP) install -q -e ".[test]"
	@touch $@

install: $(ENV)/.esm_gearnet-core

demo: $(ENV)/.esm_gearnet-core
	$(PY) script/demo.py
	$(PY) script/downstream.py -c config/demo/esm_gearnet.yaml --output_dir output/demo

test: $(ENV)/.esm_gearnet-test
	@echo "make test: the whole suite, about 14 minutes on 2 cores (make test-fast: without the slow tests)"
	$(PY) -m pytest -q tests

test-fast: $(ENV)/.esm_gearnet-test
	$(PY) -m pytest -q tests -m "not slow"

# The fast suite on the oldest and the newest Python besides the default one (CI runs the whole suite on that),
# each in its own .venv-pythonX.Y; an interpreter is found on PATH or under `pyenv root`. On a machine that reaches
# PyPI only, torch there is the CUDA build: 2.7 GB to download and 5.2 GB per environment (this machine's CPU
# wheel in /opt/wheels is for Python 3.11 only). Every one is run; those that failed are named at the end.
TEST_PYTHONS ?= python3.10 python3.13
.PHONY: test-versions test-pythons
test-versions: test-pythons
	@failed=; for python in $(TEST_PYTHONS); do \
		echo "make test-versions: the fast suite on $$python"; \
		env -u VIRTUAL_ENV $(MAKE) --no-print-directory test-fast PYTHON=$$python || failed="$$failed $$python"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test-versions: the fast suite failed on$$failed." >&2; exit 1; fi

# each of TEST_PYTHONS found and supported, or one sentence and exit 2 (before anything is installed)
test-pythons:
	@$(foreach python,$(TEST_PYTHONS),$(call check_python,$(call find_python,$(python)),$(python)) && \
		echo "$(python): $(call find_python,$(python))";) true

# every benchmark on this machine, each recorded in benchmarks/results/NAME.json (about 40 min on 2 cores; run
# it on an idle machine), then the tables rendered from them. One: `python benchmarks/record.py NAME [ARGS]`.
BENCHMARKS = peak structure_io graph_construction three_di encoders dataset esm_attention embed saprot_step \
	startup train_step stream
bench: $(ENV)/.esm_gearnet-core
	$(PIP) install -q biotite
	for name in $(BENCHMARKS); do $(PY) benchmarks/record.py $$name || exit 1; done
	$(PY) benchmarks/record.py --as train_step_stream train_step --levers stream --max-proteins 24
	$(MAKE) figures

# the tables of README.md, benchmarks/README.md and docs/ from benchmarks/results/*.json
figures:
	$(PYTHON) benchmarks/figures.py

$(ENV)/.esm_gearnet-docs: $(ENV)/.esm_gearnet-core
	$(PIP) install -q -e ".[docs]"
	@touch $@

# the documentation site in site/ (mkdocs --strict: a broken link, anchor or API reference fails the build; the
# figures in it are checked by tests/test_figures.py);
# `make docs-serve` serves it on http://127.0.0.1:8000 while you edit
docs: $(ENV)/.esm_gearnet-docs
	NO_MKDOCS_2_WARNING=1 $(ENV)/bin/mkdocs build --strict

docs-serve: $(ENV)/.esm_gearnet-docs
	NO_MKDOCS_2_WARNING=1 $(ENV)/bin/mkdocs serve

# The GPU check (benchmarks/gpu_check.py): the CUDA tests and the GPU benchmarks in priority order within an
# 8-minute deadline, report.md, log.txt and results.json rewritten in GPU_OUT after every step. Without CUDA it
# says so in one line and exits 0; `make gpu-rehearse` runs every step on the CPU with tiny sizes (< 3 min).
# A GPU machine without network gets .gpu/ carried with the working tree: `make gpu-wheels gpu-data` here, then
# the line `make gpu-command` prints, run there in the repository root (no make needed) with OUT set.
GPU_OUT ?= gpu_out
GPU_WHEELS ?= .gpu/wheels
SHARED_DATA ?= $(or $(ESM_GEARNET_SHARED_DATA),../shared/data)

gpu-check:
	@if [ -d $(GPU_WHEELS) ]; then $(PYTHON) -m pip install -q --no-index --no-deps $(GPU_WHEELS)/*.whl; fi
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_OUT)

gpu-rehearse: $(ENV)/.esm_gearnet-test
	$(PY) benchmarks/gpu_check.py --rehearse --out $(GPU_OUT)

# only what the GPU image (Python 3.12, torch 2.11, numpy, transformers, msgpack, safetensors, pytest, h5py,
# filelock, ...) lacks, pinned to the versions the tests pass with here (foldcomp imports httpx, for its own
# downloads): 4.3 MiB
gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		--no-deps -d $(GPU_WHEELS) fair-esm==2.0.0 gemmi==0.7.5 lmdb==3.0.0 easydict==1.14 mini3di==0.2.1 \
		foldcomp==1.0.0 httpx==0.29.0 httpcore==1.0.9 anyio==4.16.0 h11==0.16.0 idna==3.20 \
		certifi==2026.10.19.post1 sniffio==1.3.1

# the data the CUDA tests and the benchmarks read, copied from the shared data into .gpu/data
gpu-data:
	ESM_GEARNET_SHARED_DATA=$(SHARED_DATA) $(PYTHON) benchmarks/gpu_check.py --pack-data

gpu-command:
	@$(PYTHON) benchmarks/gpu_check.py --print-command
