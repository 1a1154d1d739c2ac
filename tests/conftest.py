"""Shared test fixtures: the default model (pulled once into the store) and the reference numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "smollm2-135m-instruct-q4_1.json"


@pytest.fixture(scope="session")
def reference() -> dict:
    """Numbers from an independent implementation (transformers, float32) for the default model."""
    if not FIXTURES.exists():
        pytest.fail(f"reference fixtures missing: {FIXTURES} (shared/ must sit beside the repository)")
    return json.loads(FIXTURES.read_text())


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF, pulled into the store on first use (CAMELID_HOME or ~/.cache/camelid)."""
    from camelid.store import DEFAULT_MODEL, resolve

    return resolve(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def llm(default_model_path):
    import camelid

    return camelid.load(default_model_path, quant=None)  # the float32 reference path


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch) -> Path:
    """An empty model store for tests that pull or remove."""
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def require_llama_cpp():
    """The llama_cpp module (llama-cpp-python), the peer of the GGUF interop tests. `make test` installs it and sets
    CAMELID_REQUIRE_LLAMA_CPP=1: then a missing peer FAILS the test; elsewhere (a bare pytest run) it skips."""
    try:
        import llama_cpp
    except ImportError as e:
        if os.environ.get("CAMELID_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(f"llama-cpp-python is expected (CAMELID_REQUIRE_LLAMA_CPP=1) but cannot be imported: {e}")
        pytest.skip(f"llama-cpp-python not installed ({e}); `make test` installs it")
    return llama_cpp


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
