"""The models one server offers: loaded on demand, least recently used idle one unloaded to make room.

Each entry is a name and a source (a store name or a path); loaded, it holds a ServerState (its own engine,
tokenizer and chat template). A request leases its model (`acquire`), which loads it when needed; requests for a
model that is loading wait for it; `release` starts the model's keep-alive:

    keep_alive  -1: pinned (never unloaded)   0: unloaded when its last request ends   N: N seconds idle

Room is `max_loaded` models and `memory_bytes` of weights and KV; a load that does not fit first unloads the
least recently used idle (unleased, unpinned) model, or waits for one to become idle. Loading runs in a thread,
so the other models' engines (their own threads) keep streaming meanwhile. Options of a request (sampling,
length, stop) are the engine's per-sequence business and never reload a model. A LoRA adapter is an entry
too: its name leases its base model, whose engine runs the adapter per row.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..threads import in_own_thread_async
from .params import ApiError

DEFAULT_MODEL_KEEP_ALIVE = 300.0  # seconds an idle model stays loaded (Ollama's default is 5 minutes)
MODEL_SUFFIXES = (".gguf",)


@dataclass(eq=False)
class Entry:
    name: str
    source: str | None
    keep_alive: float = DEFAULT_MODEL_KEEP_ALIVE
    state: object | None = None  # the ServerState, while loaded
    status: str = "unloaded"  # "loaded", "loading", "unloaded"
    leases: int = 0
    loads: int = 0  # times loaded (a test's load counter)
    last_used: float = 0.0
    expires: float | None = None  # monotonic time to unload at when idle; None: pinned or leased
    bytes: int = 0
    base: str | None = None  # an adapter: the entry whose engine runs it


def parse_keep_alive(value) -> float | None:
    """A keep_alive value (-1, 0, seconds, or a duration such as "5m", "30s", "1h") in seconds; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError(400, "'keep_alive' must be a number of seconds or a duration like '5m'", "keep_alive", "invalid_type")
    if isinstance(value, int | float):
        return -1.0 if value < 0 else float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if m:
            n = float(m.group(1))
            return -1.0 if n < 0 else n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    raise ApiError(400, f"'keep_alive' must be a number of seconds or a duration like '5m', got {value!r}",
                   "keep_alive", "invalid_value")


def models_in(folder: str) -> dict[str, str]:
    """--models-dir: every GGUF file and model folder (config.json or params.json) in `folder`, by stem."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.endswith(MODEL_SUFFIXES):
            out[os.path.splitext(name)[0]] = path
        elif os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "params.json")):
            out[name] = path
    return out


class Registry:
    """The server's models; `build(name, source)` loads one into a ServerState (engine not started)."""

    def __init__(self, sources: dict[str, str | None], build: Callable[[str, str | None], object], max_loaded: int = 1,
                 memory_bytes: int = 0, keep_alive: float = DEFAULT_MODEL_KEEP_ALIVE, wait_s: float = 600.0) -> None:
        self.entries = {name: Entry(name, source, keep_alive) for name, source in sources.items()}
        self.build, self.max_loaded, self.memory_bytes, self.wait_s = build, max(1, max_loaded), memory_bytes, wait_s
        self.default = next(iter(self.entries))
        self.cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self.cond is None:
            self.cond = asyncio.Condition()
        return self.cond

    def add_loaded(self, name: str, state) -> None:
        """A model loaded at start (the first one), and its adapters as entries of their own."""
        e = self.entries[name]
        e.state, e.status, e.loads, e.last_used = state, "loaded", e.loads + 1, time.monotonic()
        e.bytes = _footprint(state)
        e.expires = time.monotonic() + e.keep_alive if e.keep_alive >= 0 else None
        for adapter in getattr(state, "adapters", ()):
            self.entries[adapter] = Entry(adapter, None, base=name)

    def find(self, model) -> Entry:
        if model is None:
            return self.entries[self.default]
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model", "invalid_type")
        entry = self.entries.get(model)
        if entry is None:
            have = ", ".join(repr(m) for m in self.entries)
            raise ApiError(404, f"the model {model!r} does not exist; this server has {have}", "model", "model_not_found")
        return self.entries[entry.base] if entry.base else entry

    def _loaded(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.status != "unloaded" and e.base is None]

    def _estimate(self, entry: Entry) -> int:
        try:
            return os.path.getsize(entry.source) if entry.source and os.path.isfile(entry.source) else entry.bytes
        except OSError:
            return entry.bytes

    def _fits(self, entry: Entry) -> bool:
        loaded = self._loaded()
        if len(loaded) >= self.max_loaded:
            return False
        return not self.memory_bytes or sum(e.bytes for e in loaded) + self._estimate(entry) <= self.memory_bytes

    async def acquire(self, model) -> Entry:
        """Lease the model a request names (loading it, waiting for room or for its load); ApiError when it cannot."""
        entry = self.find(model)
        cond = self._condition()
        deadline = time.monotonic() + self.wait_s
        async with cond:
            while True:
                if entry.status == "loaded":
                    entry.leases += 1
                    entry.expires = None
                    return entry
                if entry.status == "unloaded":
                    while not self._fits(entry):
                        # idle and not pinned: loaded, unleased, with an expiry
                        idle = [e for e in self._loaded() if e.status == "loaded" and not e.leases and e.expires is not None]
                        if not idle:
                            break
                        await self._unload(min(idle, key=lambda e: e.last_used))
                    if self._fits(entry):
                        break
                if time.monotonic() > deadline:
                    raise ApiError(503, f"no room to load {entry.name!r}: the loaded models are busy or pinned", "model",
                                   "model_unavailable", type="server_error", headers={"Retry-After": "5"})
                try:  # wait for a load to end or a model to become idle
                    await asyncio.wait_for(cond.wait(), timeout=0.5)
                except TimeoutError:
                    pass
            entry.status = "loading"
        try:
            state = await in_own_thread_async(self.build, entry.name, entry.source)
            state.engine.start()
        except Exception as e:
            async with cond:
                entry.status = "unloaded"
                cond.notify_all()
            message = str(e) if not isinstance(e, ApiError) else e.message
            raise ApiError(500, f"cannot load {entry.name!r}: {message}", "model", "model_load_failed",
                           type="server_error") from None
        async with cond:
            entry.state, entry.status, entry.loads, entry.leases = state, "loaded", entry.loads + 1, 1
            entry.bytes, entry.expires = _footprint(state), None
            cond.notify_all()
        return entry

    async def release(self, entry: Entry, keep_alive: float | None = None) -> None:
        """End a lease; the model's keep-alive starts when it is idle. A request's keep_alive becomes the model's
        (the last one given wins, as in Ollama: -1 pins it until a request gives another value)."""
        cond = self._condition()
        async with cond:
            entry.leases -= 1
            entry.last_used = time.monotonic()
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            ka = entry.keep_alive
            if entry.leases == 0:
                entry.expires = None if ka < 0 else entry.last_used + ka
                if ka == 0:
                    await self._unload(entry)
            cond.notify_all()

    async def reap(self) -> None:
        """Unload idle models whose keep-alive has passed (run every half second by the app)."""
        cond = self._condition()
        async with cond:
            now = time.monotonic()
            for e in self._loaded():
                if e.status == "loaded" and not e.leases and e.expires is not None and e.expires <= now:
                    await self._unload(e)
            cond.notify_all()

    async def _unload(self, entry: Entry) -> None:
        state, entry.state, entry.status, entry.expires = entry.state, None, "unloaded", None
        if state is not None:
            await asyncio.to_thread(state.engine.stop)
            state.engine.prompt_cache.store.drop_owner(state.engine.prompt_cache.model_key)

    def stop_all(self) -> None:
        for e in self._loaded():
            if e.state is not None:
                e.state.engine.stop()

    def listing(self) -> list[dict]:
        out = []
        for e in self.entries.values():
            status = self.entries[e.base].status if e.base else e.status
            item = {"id": e.name, "status": status, "loads": (self.entries[e.base] if e.base else e).loads}
            if e.base:
                item["parent"] = e.base
            out.append(item)
        return out


def _footprint(state) -> int:
    """Bytes of a loaded model: its parameters and buffers (the weights) and its engine's KV slots."""
    model, cache = state.engine.model, state.engine.cache
    tensors = [*model.parameters(), *model.buffers(), *cache.k, *cache.v]
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
