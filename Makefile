# Two entry points: `make demo` and `make test` (which runs `make lint` first). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel; GPU users install their own CUDA build of torch into the venv first.
TORCH  ?= torch==2.13.0
DEMO_DIR ?= demo_output

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,report]'
	$(PY) -c "from scvi_scale.kernels import torch_ops; torch_ops.native_ready()"  # builds the C likelihood kernel (~1 s)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m scvi_scale.demo --out $(DEMO_DIR)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy  # what it checks and how: [tool.mypy] in pyproject.toml

test: lint
	$(PY) -m pytest -q

.PHONY: install demo lint test
