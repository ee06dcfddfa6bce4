# One entry point for people and CI. Everything installs into ./.venv.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
ROOT ?= demo/root

.PHONY: install demo run test lint bench clean

$(BIN)/sidecar: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/sidecar

# Writes a demo execution folder, then runs everything (Redis, watcher, worker, API) on it.
demo: install
	$(BIN)/python scripts/demo.py $(ROOT)
	$(BIN)/sidecar up --root $(ROOT)

run: install
	$(BIN)/sidecar up --root $(ROOT)

# Whole modules go to 3 processes (--dist loadfile keeps a module's shared servers in one):
# most tests wait on Redis, PostgreSQL or a child process, so 3 beat 2 cores' worth. WORKERS=0
# runs everything in this process.
WORKERS ?= 3
test: install
	$(BIN)/pytest $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

# Benchmarks against the real Redis and PostgreSQL (see docs/benchmarks.md); QUICK=1 for a smoke run;
# PEERS=1 adds the pages against MLflow (bench/peers, MLflow in bench/peers/.venv-mlflow).
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py $(if $(QUICK),--quick,) $(if $(PEERS),--peers,)

lint: install
	$(BIN)/ruff check worker tests bench scripts
	$(BIN)/ruff format --check worker tests bench scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .sidecar demo
