# meshtrain: `make demo` and `make test` each set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
# CPU build from local disk where available; never pulled when torch already imports.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow test-netns test-all lint bench clean openapi

setup: $(VENV)/.installed

# A torch the system already has (a CUDA build, say) is reused through --system-site-packages, never
# replaced; only where none imports is $(TORCH_SPEC) installed.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { python3 -c "import torch" 2>/dev/null && python3 -m venv --system-site-packages $(VENV) \
		|| python3 -m venv $(VENV); }
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

# Each benchmark prints a table and writes bench/results/<name>.json (about 40 minutes in all on 2 cores).
bench: setup
	$(PY) bench/bench_crdt.py
	$(PY) bench/bench_p2p.py
	$(PY) bench/bench_gossip.py
	$(PY) bench/bench_scale.py
	$(PY) -m bench.convergence

# After changing daemon/status.py: regenerate the status schemas at the end of the OpenAPI document.
openapi: setup
	$(PY) -c "from pathlib import Path; from daemon.status import openapi_yaml; \
	p = Path('daemon/service/openapi.yaml'); p.write_text(openapi_yaml(p.read_text()))"

clean:
	rm -rf $(VENV) .demo .pytest_cache
