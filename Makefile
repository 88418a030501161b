# Two entry points: `make demo` (install + quickstart) and `make test` (install + ruff + pytest).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench mutation clean

$(BIN)/mmalign: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing later pulls a CUDA build of several GB.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/mmalign

install: $(BIN)/mmalign

demo: install
	$(BIN)/mmalign quickstart

test: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/python -m pytest -n 2 --dist worksteal

bench: install
	$(BIN)/python benchmarks/bench_train_step.py

# On demand, not in CI: mutation testing of the core modules (see README, Development). ARGS="--sample 30" etc.
mutation: install
	$(BIN)/pip install --quiet -e ".[mutation]"
	$(BIN)/python scripts/mutation.py $(ARGS)

clean:
	rm -rf runs data .pytest_cache mutants
