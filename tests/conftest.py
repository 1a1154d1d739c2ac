"""Shared test fixtures: the default model (pulled once into the store) and the reference numbers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "smollm2-135m-instruct-q4_1.json"

# The tests share the user's model store (the default model is pulled once), but never the compiled decode steps a
# user built there with `camelid compile`: a package would take every decode step (speculation stands aside for it)
# and the same test would then check a different path on a machine that has one. Tests of the compiled step bind
# their own packages; subprocesses inherit this.
os.environ["CAMELID_COMPILED"] = "0"
# Nor the converted models that loads keep in the store (camelid/converted.py): every tiny model a test writes would
# leave one there. tests/test_converted.py turns the cache on in a store of its own.
os.environ["CAMELID_CONVERTED"] = "0"


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


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global random state, so what a test draws without a generator of its own
    does not depend on which tests ran before it (a Q6_K bound once failed on an unlucky draw, 1 run in many)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch) -> Path:
    """An empty model store for tests that pull or remove."""
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def camelid_cli(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The `camelid` command as a user runs it: a real subprocess, its output captured as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "camelid", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The single `camelid: error: ...` line a failed command printed (no traceback, nothing else on stderr)."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("camelid: error:"), r.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_path, *flags: str):
    """`python -m camelid.serve MODEL --port P FLAGS...` on loopback, up and healthy: yields (base URL, process)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "camelid.serve", str(model_path), "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)  # polling for the server to come up
    else:
        proc.kill()
        pytest.fail("the server did not come up in 300 s")
    try:
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_torchrun(args: list[str], nproc: int, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node=N ARGS` on loopback, one thread per process. The port is
    picked free just before; should another process take it in between (the rendezvous then fails with "address
    already in use"), it runs again on a new one, at most three times."""
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    for _ in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--local-addr=127.0.0.1", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    return proc


def run_script(script: Path, *args: str, torchrun: int = 0, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a test file as a training script, one thread per process (under torchrun with `torchrun` processes, on
    loopback); with check, a non-zero exit fails with the output's tails."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    if torchrun:
        proc = run_torchrun([str(script), *args], torchrun, env, timeout)
    else:
        proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_random_model():
    """A two-layer Llama (dim 32, GQA 4/2 heads, vocabulary 50) with every weight drawn from N(0, 0.3), seed 0."""
    import torch

    from camelid.config import ModelConfig
    from camelid.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.reset_buffers()
    return model


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
    # camelid's attention kernel (camelid/kernels.py) is used by a process's fast path when it is built; built here,
    # before any test, every test process and subprocess attends the same way (it is kept in the store: seconds
    # after the first time). Where no compiler can build it, the whole suite runs without it.
    from camelid import kernels

    try:
        kernels.load(build_missing=True)
    except kernels.KernelError as e:
        print(f"camelid's attention kernel is not built ({e}): the tests run torch's attention", file=sys.stderr)
        os.environ["CAMELID_KERNELS"] = "0"


class Collector:
    """An engine sequence's `emit`: the token ids it gets, then its one Finish (`done` is set then)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.finish = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        from camelid.serve.engine import Finish

        if isinstance(event, Finish):
            self.finish = event
            self.done.set()
        else:
            self.ids.append(event.id)
