# Two commands for a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint dry-run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[cpu,dev]"
	touch $@

demo: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/snakemake --cores $(CORES)
	@echo
	@echo "Exported model(s): $$(ls -d results/export/*/ 2>/dev/null | tr '\n' ' ')"

dry-run: install
	$(BIN)/snakemake -n

test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check workflow/scripts tests benchmarks resources/demo
	$(BIN)/ruff format --check workflow/scripts tests benchmarks resources/demo
	$(BIN)/snakefmt --check workflow/
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs .snakemake
