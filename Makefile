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

ifdef VIRTUAL_ENV
ENV := $(VIRTUAL_ENV)
else
ENV := .venv
endif
PY := $(ENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install demo test bench gpu-check gpu-wheels

$(PY):
	$(PYTHON) -m venv $(ENV)

$(ENV)/.esm_gearnet-core: pyproject.toml setup.py | $(PY)
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
	$(PY) -m pytest -q tests

bench: $(ENV)/.esm_gearnet-core
	$(PIP) install -q biotite
	$(PY) benchmarks/structure_io.py
	$(PY) benchmarks/graph_construction.py

# The GPU path on a CUDA machine, install included, within 10 minutes; on a machine without CUDA, one line and
# exit 0. It uses the machine's own Python and torch (a CUDA build), installing the package's other dependencies
# from GPU_WHEELS when that folder exists (machines without network: `make gpu-wheels` fills it beforehand).
GPU_WHEELS ?= .gpu/wheels
GPU_REPORT ?= gpu_report.md

gpu-check:
	@$(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || \
		{ echo "gpu-check: no CUDA device on this machine; nothing to check."; exit 0; }; \
	if [ -d $(GPU_WHEELS) ]; then $(PYTHON) -m pip install -q --no-deps $(GPU_WHEELS)/*.whl; fi; \
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e . && \
	$(PYTHON) benchmarks/gpu_check.py --report $(GPU_REPORT)

# the dependencies in pyproject.toml that the GPU image (torch, numpy, yaml, jinja2, tqdm, matplotlib) lacks, and pytest with its own
gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 \
		--no-deps -d $(GPU_WHEELS) fair-esm gemmi lmdb easydict msgpack safetensors mini3di pytest iniconfig pluggy packaging pygments
