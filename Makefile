# ace: make demo (train a toy ACE, evaluate it, edit with it), make test, make lint, make bench.
PYTHON ?= python3
# The CPU wheel of PyTorch that this machine keeps on disk; a torch that is already
# installed (a CUDA build, say) is left alone.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint bench demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	@$(PYTHON) -m pip install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) scripts/benchmark.py

demo: install
	$(PYTHON) scripts/demo.py
