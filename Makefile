# meshtrain: `make demo` and `make test` each set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
# CPU build from local disk where available; never pulled when torch already imports.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow test-netns test-all lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PYTEST) -m "not slow and not netns"

test-slow: setup
	$(PYTEST) -m "slow and not netns"

test-netns: setup
	$(PYTEST) -m "netns"

test-all: setup lint
	$(PYTEST)

demo: setup
	$(VENV)/bin/meshtrain cluster demo --nodes 4 --dir .demo

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache
