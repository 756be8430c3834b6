# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test bench

install:
	@# torch first, pinned: a bare `torch` requirement would pull several GB of CUDA wheels on a CPU machine
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) script/demo.py
	$(PYTHON) script/downstream.py -c config/demo/esm_gearnet.yaml --output_dir output/demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m pip install -q biotite
	$(PYTHON) benchmarks/structure_io.py
	$(PYTHON) benchmarks/graph_construction.py
