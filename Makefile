# The README's two commands: `make demo` and `make test`. CI runs `make test` (see .ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint format typecheck check demo bench wheelhouse image clean schemas

install: $(VENV)/.installed tests/node/node_modules/.package-lock.json

# constraints-dev.txt pins the test and lint tools, so a new release cannot change the outcome.
$(VENV)/.installed: pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints-dev.txt -e '.[dev]'
	touch $@

# The foreign-client test's modules (tests/node, from its package-lock.json), when npm exists;
# without them that one test skips and says why.
tests/node/node_modules/.package-lock.json: tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node client test (tests/test_node_client.py) will skip"; fi

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

# what to run before a commit: lint (ruff + mypy strict), then the whole suite
check: lint test

# schemas/ is generated from the wire types; tests/test_schema.py fails when it is out of date
schemas: install
	$(BIN)/python -m agentbus.schema schemas

demo: install
	$(BIN)/python -m agentbus.demo

bench: install
	$(BIN)/agentbus bench log --events 5000

# Wheels for agentbus, every dependency and the build backend, so the image builds with no registry.
wheelhouse: install
	$(BIN)/pip wheel --quiet --wheel-dir compose/wheelhouse . hatchling

BASE_IMAGE ?= python:3.11-slim
image: wheelhouse
	DOCKER_BUILDKIT=0 docker build --network host -f compose/Dockerfile \
		--build-arg OFFLINE=1 --build-arg BASE_IMAGE=$(BASE_IMAGE) -t agentbus:latest .

clean:
	rm -rf $(VENV) .agentbus .pytest_cache .mypy_cache .ruff_cache
