# Keystone — the two set-up commands are `make dev` and `make test`; both bootstrap uv.
SHELL := /bin/bash
TOOLS := .tools
UV := $(TOOLS)/bin/uv
PYTEST_ARGS ?=

.PHONY: dev test test-all lint types imports unit integration bootstrap clean

$(UV):
	@command -v python3 >/dev/null || { echo "python3 (3.11+) is required" >&2; exit 1; }
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv

# Bytecode is compiled once here: with PYTHONDONTWRITEBYTECODE set (as on CI hosts) every
# process — each Dagster run, each API started by the tests — would otherwise recompile
# thousands of modules (~5 s per process on a 2-core host).
bootstrap: $(UV)
	UV_COMPILE_BYTECODE=1 $(UV) sync --frozen
	$(UV) run --frozen python -m compileall -q -j 0 keystone_core keystone_api keystone_pipelines keystone_cli keystone_receiver

## make dev: the embedded stack (SQLite, embedded S3, API, Dagster, demo data)
dev: bootstrap
	$(UV) run --frozen keystone dev

lint: bootstrap
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

types: bootstrap
	$(UV) run --frozen mypy

imports: bootstrap
	$(UV) run --frozen lint-imports

## make test: lint + types + import contracts + the test suite (no `slow` marker)
test: lint types imports
	$(UV) run --frozen pytest -m "not slow" $(PYTEST_ARGS)

## make test-all: everything, including the long suites marked `slow`
test-all: lint types imports
	HYPOTHESIS_PROFILE=thorough $(UV) run --frozen pytest $(PYTEST_ARGS)

unit: bootstrap
	$(UV) run --frozen pytest tests/unit $(PYTEST_ARGS)

integration: bootstrap
	$(UV) run --frozen pytest -m integration $(PYTEST_ARGS)

clean:
	rm -rf $(TOOLS) .venv .mypy_cache .ruff_cache
