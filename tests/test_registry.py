"""Several models in one server: the registry's loading, waiting, eviction and keep-alive, with stand-in models
(the logic), and end to end through `camelid serve a=MODEL b=MODEL` (slow)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch

from camelid.prompt_cache import BlockStore, PromptCache
from camelid.serve.params import ApiError
from camelid.serve.registry import Registry, parse_keep_alive


class FakeEngine:
    def __init__(self, name: str, store: BlockStore) -> None:
        self.model = torch.nn.Linear(4, 4)
        self.cache = type("C", (), {"k": [torch.zeros(10)], "v": [torch.zeros(10)]})()
        self.prompt_cache = PromptCache(store, name)
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


class FakeState:
    def __init__(self, name: str, store: BlockStore) -> None:
        self.model_id, self.engine, self.adapters = name, FakeEngine(name, store), ()


def make(max_loaded=1, load_s=0.0, keep_alive=300.0):
    store = BlockStore(1 << 20)
    gate = threading.Event()
    gate.set()

    def build(name, source):
        gate.wait(30)
        time.sleep(load_s)
        return FakeState(name, store)

    reg = Registry({"a": "a.gguf", "b": "b.gguf"}, build, max_loaded=max_loaded, keep_alive=keep_alive, wait_s=30)
    return reg, gate


def loaded(reg) -> set[str]:
    return {m["id"] for m in reg.listing() if m["status"] != "unloaded"}


def test_a_then_b_then_a_with_room_for_one_never_holds_two():
    async def go():
        reg, _ = make()
        seen = []
        for name in "aba":
            e = await reg.acquire(name)
            seen.append(loaded(reg))
            assert e.state.model_id == name and e.state.engine.running
            await reg.release(e)
        assert seen == [{"a"}, {"b"}, {"a"}]
        assert {m["id"]: m["loads"] for m in reg.listing()} == {"a": 2, "b": 1}
    asyncio.run(go())


def test_keep_alive_zero_unloads_and_minus_one_pins():
    async def go():
        reg, _ = make(max_loaded=1)
        e = await reg.acquire("a")
        await reg.release(e, 0.0)
        assert loaded(reg) == set() and e.state is None
        e = await reg.acquire("a")
        await reg.release(e, -1.0)  # pinned: a request for b cannot evict it
        reg.wait_s = 1.0
        with pytest.raises(ApiError) as err:
            await reg.acquire("b")
        assert err.value.status == 503 and loaded(reg) == {"a"}
        e = await reg.acquire("a")  # unpinned by a later keep_alive
        await reg.release(e, 0.05)
        await asyncio.sleep(0.1)
        await reg.reap()
        assert loaded(reg) == set()
    asyncio.run(go())


def test_a_request_during_a_load_waits_and_the_same_load_serves_it():
    async def go():
        reg, gate = make(max_loaded=2)
        gate.clear()
        first = asyncio.create_task(reg.acquire("b"))
        await asyncio.sleep(0.05)
        assert [m["status"] for m in reg.listing() if m["id"] == "b"] == ["loading"]
        second = asyncio.create_task(reg.acquire("b"))
        other = await reg.acquire("a")  # another model is served meanwhile
        assert other.state.engine.running
        gate.set()
        e1, e2 = await first, await second
        assert e1 is e2 and e1.loads == 1 and e1.leases == 2
    asyncio.run(go())


def test_keep_alive_values():
    assert parse_keep_alive(None) is None and parse_keep_alive(-1) == -1 and parse_keep_alive(0) == 0
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("30s") == 30 and parse_keep_alive("1h") == 3600
    for bad in ("soon", True, [1]):
        with pytest.raises(ApiError):
            parse_keep_alive(bad)


@pytest.mark.slow
def test_server_with_two_models_loads_on_demand_and_options_never_reload(default_model_path):
    from conftest import running_server

    with running_server(f"a={default_model_path}", f"b={default_model_path}", "--max-loaded", "1",
                        "--max-seq-len", "256", "--max-concurrency", "2") as (base, _):
        def ask(model, **extra):
            body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, **extra}
            r = httpx.post(base + "/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        def status():
            return {m["id"]: (m["status"], m["loads"]) for m in httpx.get(base + "/v1/models", timeout=30).json()["data"]}

        a1 = ask("a")
        assert status() == {"a": ("loaded", 1), "b": ("unloaded", 0)}
        assert ask("a", max_tokens=2, stop=["x"], top_k=5) and status()["a"] == ("loaded", 1)  # options: no reload
        b = ask("b")
        assert status() == {"a": ("unloaded", 1), "b": ("loaded", 1)}
        assert ask("a") == a1 == b
        assert status() == {"a": ("loaded", 2), "b": ("unloaded", 1)}
        r = httpx.post(base + "/v1/completions", json={"model": "c", "prompt": "x"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
