# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test lint setup clean

$(BIN)/blindspots: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolve would pull the multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,dask]'
	touch $@

setup: $(BIN)/blindspots

demo: setup
	$(BIN)/blindspots demo --out $(OUT)

test: setup
	$(BIN)/ruff check .
	# the tree's floors (.importlinter): a layer imports only the layers below it
	$(BIN)/lint-imports --no-logo
	# the typed seams: core, runtime, defenses and pipeline ([tool.mypy] in pyproject.toml)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
