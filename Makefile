# ace: make demo (train a toy ACE, evaluate it, edit with it), make test, make lint, make bench.
PYTHON ?= python3
# The CPU wheel of PyTorch that this machine keeps on disk; a torch that is already
# installed (a CUDA build, say) is left alone if it is one pyproject.toml accepts (>= 2.4):
# an older one would be upgraded by pip to PyPI's newest, a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
HAS_TORCH = import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 4))

.PHONY: install test lint bench demo

install:
	@$(PYTHON) -c '$(HAS_TORCH)' 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
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
