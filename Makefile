# `make run` sets everything up on a fresh machine and answers a prompt with the default model;
# `make test` sets up and runs the test suite. Both are idempotent.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: setup run test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build on this machine's disk; the project itself asks only torch>=2.5
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# the web chat page's end-to-end test drives Debian's chromium (never a browser download)
$(VENV)/.browser: | $(BIN)/python
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "warning: could not install chromium; the browser test will be skipped"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/camelid run "$(PROMPT)"

test: setup $(VENV)/.browser
	$(BIN)/python -m pytest -q

test-fast: setup $(VENV)/.browser
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check camelid tests bench

bench: setup
	$(BIN)/camelid bench

clean:
	rm -rf $(VENV) build *.egg-info
