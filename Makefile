# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment first if it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# e.g. make demo DEMO_ARGS="--max-seconds 1200" on a slow machine (trainingd demo --help)
DEMO_ARGS ?=

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,export,ray]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/trainingd demo $(DEMO_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy daemon

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q --durations=25

bench: $(VENV)/.installed
	$(BIN)/python bench/validate_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
