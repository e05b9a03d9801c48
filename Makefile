# Two commands on a fresh machine: `make run` (install + the whole pipeline on the embedded
# default) and `make test` (install + the test suite). Installs are pinned by constraints.txt.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Stage commands in dvc.yaml (`python -m tasks.run ...`) must resolve to the project's venv.
export PATH := $(BIN):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-fast lint format bench prefect-server serve mlflow-ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

run: install
	dvc repro
	@echo "--- evaluation (every metric: dvc metrics show) ---"
	voiceprint results
	@echo "--- encoder comparison (compare.md) ---"
	@cat compare.md
	@echo "--- dvc status ---"
	dvc status

test: install
	python -m pytest -q

test-fast: install
	python -m pytest -q -m 'not slow'

# ruff (configured in pyproject.toml): lint and formatting check, as CI runs them.
lint: install
	ruff check .
	ruff format --check .

format: install
	ruff check --fix .
	ruff format .

# Peer vs ours, one JSON line per measurement, then benchmarks/RESULTS.md (~6 min on 2 CPU cores).
# Run it on an otherwise idle machine: contention distorts the ratios.
BENCH_OUT := benchmarks/results.jsonl
bench: install
	rm -f $(BENCH_OUT)
	python benchmarks/bench_embed.py --out $(BENCH_OUT)
	python benchmarks/bench_verify.py --out $(BENCH_OUT)
	python benchmarks/bench_pipeline.py --out $(BENCH_OUT)
	python benchmarks/bench_index.py --out $(BENCH_OUT)
	python benchmarks/report.py $(BENCH_OUT) benchmarks/RESULTS.md

# Prefect UI at http://127.0.0.1:$(PORT) ; MLflow UI at http://127.0.0.1:$(MLFLOW_PORT)
# PORT sets the Prefect server's port *and* the API address its UI calls (Prefect reads that from
# PREFECT_SERVER_API_PORT, not from --port); `make serve` uses the same PORT for PREFECT_API_URL:
#   make prefect-server PORT=4300    and, in another terminal,    make serve PORT=4300
PORT ?= 4200
MLFLOW_PORT ?= 5000
prefect-server: install
	PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PORT) prefect server start --host 127.0.0.1 --port $(PORT)

serve: install
	PREFECT_API_URL=http://127.0.0.1:$(PORT)/api python -m flows.serve --project-dir .

mlflow-ui: install
	mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts

clean:
	rm -rf $(VENV) .pytest_cache
