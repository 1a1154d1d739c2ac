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

# the llama.cpp peer for the interop tests (GGUF that camelid writes must load in llama.cpp): a portable build for any
# x86-64 CPU, compiled once (minutes) into ~/.cache/camelid/wheels and reused by every later clone and .venv
$(VENV)/.llama-cpp: scripts/llama-cpp-peer.sh | $(VENV)/.installed
	scripts/llama-cpp-peer.sh $(BIN)/pip portable
	touch $@

# CAMELID_REQUIRE_LLAMA_CPP=1: a llama.cpp test fails, not skips, when the peer is missing
test: setup $(VENV)/.browser $(VENV)/.llama-cpp
	CAMELID_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -q --durations=25

test-fast: setup $(VENV)/.browser $(VENV)/.llama-cpp
	CAMELID_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check camelid tests bench

# llama.cpp for the comparison, built for the instruction sets this CPU has (read from /proc/cpuinfo by the script),
# AMX off (its AMX build crashes on our machines); set LLAMA_CMAKE_ARGS to choose others. It replaces the portable
# test build in .venv (the tests pass on either).
$(VENV)/.bench: $(VENV)/.installed
	scripts/llama-cpp-peer.sh $(BIN)/pip native server
	scripts/llama-cpp-tools.sh $(BIN)/pip  # llama-bench, llama-server (-np), llama-perplexity: the issues' peers
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

# the README's performance figures: camelid and its peers on the default model, same file, same threads, one run
bench: $(VENV)/.bench
	scripts/llama-cpp-peer.sh $(BIN)/pip native server  # cached: seconds
	$(BIN)/camelid bench --vs llama.cpp --vs transformers

clean:
	rm -rf $(VENV) build *.egg-info
