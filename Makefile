# Common commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: install demo test lint format quality info clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU build on the dev/CI path; an open `torch` would pull CUDA wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install  ## generate a grid of digits with the shipped model
	$(BIN)/marche generate --class-id 3 --num 16 --seed 0 --scale 4 --out out/grid.png

test: install  ## the whole test suite (CPU)
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

quality: install
	$(BIN)/marche quality --mode mar --num 500 --json out/quality_mar.json

info: install
	$(BIN)/marche info

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
