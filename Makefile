# One place for set-up and checks; CI runs `make test` (see .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train demo test lint browser test-slow bench clean

# torch first and pinned: it is the CPU build on this machine's disk, and installing it before
# pslm keeps pip from resolving the `torch>=2.5` requirement to a several-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,zh,ray]'
	touch $(STAMP)

setup: $(STAMP)

train: setup  ## the main job: a small GPT on BBC News, local cluster of 2 servers + 2 workers
	$(VENV)/bin/pslm train

demo: setup  ## the parameter server alone: a small MLP, 2 servers + 2 workers
	$(VENV)/bin/pslm demo

lint: setup
	$(VENV)/bin/ruff check pslm tests
	$(VENV)/bin/ruff format --check pslm tests
	$(VENV)/bin/mypy

# Debian's chromium for the dashboard's browser test (tests/test_dashboard.py): installed when
# missing and this is root on Debian; elsewhere that one test is skipped, saying why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "no chromium: the dashboard's browser test will be skipped"

test: lint browser  ## what CI runs: lint, types, then the default test suite (about 10 minutes)
	$(VENV)/bin/pytest

test-slow: setup  ## the long tests, kept out of the default suite
	$(VENV)/bin/pytest -m slow

bench: setup
	$(VENV)/bin/pslm bench transport
	$(VENV)/bin/pslm bench pipeline
	$(VENV)/bin/pslm bench ps
	$(VENV)/bin/pslm bench train
	$(VENV)/bin/pslm bench recovery

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis runs
