# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo demo-full test test-install image lint setup clean

$(BIN)/blindspots: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and at the tested release: a resolve of the range alone could pull the
	# multi-GB CUDA build. constraints.txt is the tested set (pyproject.toml states ranges).
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,dask]'
	touch $@

setup: $(BIN)/blindspots

demo: setup
	$(BIN)/blindspots demo --out $(OUT)

demo-full: setup
	$(BIN)/blindspots demo --full --out $(OUT)-full

test: setup
	$(BIN)/ruff check .
	# the tree's floors (.importlinter): a layer imports only the layers below it
	$(BIN)/lint-imports --no-logo
	# the typed seams: core, runtime, defenses and pipeline ([tool.mypy] in pyproject.toml)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# pip install . into fresh venvs: Python 3.11 beside another numpy minor, and 3.13 (minutes).
test-install: setup
	$(BIN)/python -m pytest -q -m install tests/architecture/test_install.py

# build docker/Dockerfile with podman from nothing, run the demo in it, compare with the host.
image: setup
	docker/build-local.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
