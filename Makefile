# Quick start: `make demo` (set up and run the offline demo), `make test` (set up and run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo-out

.PHONY: setup setup-demo demo test test-slow bench clean

# The demo needs only the core and the `demo` extra; the tests need the `test` extra (a superset).
$(VENV)/.installed-demo: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first when none is present, so no dependency pulls a CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[demo]"
	touch $@

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.installed-demo

setup: $(VENV)/.installed

setup-demo: $(VENV)/.installed-demo

demo: setup-demo
	$(VENV)/bin/langneurons demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/collect.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .cache .pytest_cache
