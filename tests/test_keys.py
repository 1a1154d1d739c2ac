"""API keys: the key file (`camelid keys add|list|revoke`), and `serve --keys` enforcing each key's scopes and limits
(401 / 403 / 400 / 429 with Retry-After), each limit exactly at its edge with an injected clock (never a sleep), the
file re-read without a restart, and a bounded load of several keys where none exceeds its limits."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import running_server
from gguf import GGMLQuantizationType as G
from gguf_factory import Spec, byte_level_vocab, write_gguf

from camelid.serve.gate import Limiter
from camelid.serve.keys import (
    DEFAULT_ENDPOINTS,
    Key,
    KeyFileError,
    KeyStore,
    add_key,
    hash_secret,
    parse_keys,
    read_keys,
    revoke_key,
    write_keys,
)

ADMIN = "admin-secret"  # --api-key beside the key file: the unrestricted key named "default"
PROMPT = [72, 101, 108, 108, 111]  # token ids: the prompt's length is exact


class Clock:
    """An injected clock that moves only when told (start: a fixed UTC time)."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# --- the key file ---------------------------------------------------------------------------------------------------

def test_key_file_keeps_only_a_hash_and_is_replaced_atomically(tmp_path):
    path = tmp_path / "keys.json"
    key, secret = add_key(path, "alice", models="tiny,other", endpoints="chat,completions", rpm=3, tpm=100,
                          concurrency=2, max_tokens=16, daily_tokens=1000, categories="S1,S10", expires="2099-12-31",
                          now=1_800_000_000.0)
    text = path.read_text()
    assert secret.startswith("sk-camelid-") and len(secret) >= len("sk-camelid-") + 43  # 32 random bytes, base64url
    assert secret not in text and secret[len("sk-camelid-"):] not in text
    assert json.loads(text)["keys"][0]["hash"] == "sha256:" + hashlib.sha256(secret.encode()).hexdigest() == hash_secret(secret)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    got = read_keys(path)["alice"]
    assert got == key and got.models == ("tiny", "other") and got.endpoints == ("chat", "completions")
    assert (got.rpm, got.tpm, got.concurrency, got.max_tokens, got.daily_tokens) == (3, 100, 2, 16, 1000)
    assert got.categories == ("S1", "S10") and got.expires == 4102444800  # works through 2099-12-31 UTC: to 2100-01-01T00:00Z
    _, other = add_key(path, "bob", now=1_800_000_000.0)
    assert other != secret and read_keys(path)["bob"].endpoints is None  # None: DEFAULT_ENDPOINTS
    inode = path.stat().st_ino
    revoked = revoke_key(path, "alice", now=1_800_000_100.0)
    assert revoked.revoked == 1_800_000_100.0 and read_keys(path)["alice"].status(1_800_000_200.0) == "revoked"
    assert path.stat().st_ino != inode  # a new file renamed over the old: a reader never sees half a file
    assert sorted(os.listdir(tmp_path)) == [".keys.json.lock", "keys.json"]  # no temporary file left
    with pytest.raises(KeyFileError, match="exists \\(revoked\\)"):
        add_key(path, "alice")
    with pytest.raises(KeyFileError, match="revoked already"):
        revoke_key(path, "alice")
    with pytest.raises(KeyFileError, match="no key named 'carol'"):
        revoke_key(path, "carol")
    unknown = json.loads(path.read_text())  # fields a newer camelid wrote survive a rewrite
    unknown["keys"][1]["note"] = "kept"
    path.write_text(json.dumps(unknown))
    add_key(path, "carol")
    assert json.loads(path.read_text())["keys"][1]["note"] == "kept"


def test_concurrent_adds_lose_no_key(tmp_path):
    path = tmp_path / "keys.json"
    names = [f"k{i}" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        secrets = dict(zip(names, pool.map(lambda n: add_key(path, n)[1], names)))
    keys = read_keys(path)
    assert sorted(keys) == sorted(names)
    assert all(keys[n].hash == hash_secret(s) for n, s in secrets.items())


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"version": 2, "keys": []}', "version 2"),
    ('{"keys": [{"name": "a b", "hash": "sha256:' + "0" * 64 + '"}]}', "each key needs a 'name'"),
    ('{"keys": [{"name": "a", "hash": "md5:00"}]}', "key 'a': 'hash' must be"),
    ('{"keys": [{"name": "a", "hash": "sha256:' + "0" * 64 + '", "rpm": 0}]}', "key 'a': 'rpm' must be a whole number"),
    ('{"keys": [{"name": "a", "hash": "sha256:' + "0" * 64 + '", "endpoints": ["chat", "admin"]}]}', "unknown endpoint 'admin'"),
    ('{"keys": [{"name": "a", "hash": "sha256:' + "0" * 64 + '", "expires": "soon"}]}', "key 'a': 'expires'"),
    ('{"keys": [{"name": "a", "hash": "sha256:' + "0" * 64 + '"}, {"name": "a", "hash": "sha256:' + "1" * 64 + '"}]}',
     "appears twice"),
    ('{"keys": [{"name": "a", "hash": "sha256:' + "0" * 64 + '"}, {"name": "b", "hash": "sha256:' + "0" * 64 + '"}]}',
     "the same secret"),
])
def test_bad_key_file_names_the_problem(text, message):
    with pytest.raises(KeyFileError, match=message):
        parse_keys(text, "k.json")


def test_store_rereads_a_changed_file_at_most_once_a_second_and_keeps_the_last_good_keys(tmp_path, capsys):
    clock, path = Clock(), tmp_path / "keys.json"
    _, a = add_key(path, "a")
    store = KeyStore(path, clock)
    assert store.lookup(a).name == "a" and store.lookup(a + "x") is None
    _, b = add_key(path, "b")
    clock.advance(0.5)
    assert store.lookup(b) is None  # looked at most once a second
    clock.advance(0.5)
    assert store.lookup(b).name == "b" and store.reloads == 1
    path.write_text('{"keys": [oops')  # an operator's typo: neither open nor locked
    clock.advance(1)
    assert store.lookup(a).name == "a" and store.lookup(b).name == "b"
    assert "the key file changed but cannot be used" in capsys.readouterr().err
    write_keys(path, {"b": store.keys["b"]})  # the operator deletes a's entry
    clock.advance(1)
    assert store.lookup(a) is None and store.lookup(b).name == "b" and store.problem is None


# --- the limiter at each edge, with a clock that moves only when told ------------------------------------------------

def test_limiter_rpm_edge():
    clock = Clock()
    lim, key = Limiter(clock), Key("k", rpm=3)
    for _ in range(3):  # the Nth passes
        assert lim.admit(key) is None
        lim.finish(key, 0, 0)
        clock.advance(10)
    r = lim.admit(key)  # the N+1th: 429 until the first has aged out of the 60 s window (at +60)
    assert (r.status, r.reason, r.retry_after, r.code) == (429, "rpm", 30, "rate_limit_exceeded")
    clock.advance(29.5)
    assert lim.admit(key).retry_after == 1
    clock.advance(0.5)
    assert lim.admit(key) is None
    assert lim.admit(key).retry_after == 10  # the second one ages out 10 s later


def test_limiter_tpm_edge():
    clock = Clock()
    lim, key = Limiter(clock), Key("k", tpm=100)
    assert lim.admit(key, reserve=10) is None
    lim.finish(key, 10, 60)
    clock.advance(5)
    assert lim.admit(key, reserve=10) is None  # 60 charged < 100
    assert lim.admit(key, reserve=29) is None  # 60 charged + 10 in flight = 70 < 100
    assert lim.admit(key, reserve=1) is None  # 60 + 39 = 99 < 100: the last that passes
    r = lim.admit(key)  # 60 + 40 = 100, the limit: refused
    assert (r.status, r.reason) == (429, "tpm")
    lim.finish(key, 10, 10)
    lim.finish(key, 29, 29)
    lim.finish(key, 1, 1)  # charged now: 60 (t0) + 40 (t0+5) = 100
    r = lim.admit(key)
    assert r.retry_after == 55  # when the 60 of t0 age out
    clock.advance(55)
    assert lim.admit(key) is None


def test_limiter_concurrency_edge():
    lim, key = Limiter(Clock()), Key("k", concurrency=2)
    assert lim.admit(key) is None and lim.admit(key) is None
    r = lim.admit(key)
    assert (r.status, r.reason, r.retry_after) == (429, "concurrency", 1)
    lim.finish(key, 0, 0)
    assert lim.admit(key) is None


def test_limiter_daily_tokens_edge_resets_at_utc_midnight():
    day = 86400 * 20833  # a UTC midnight
    clock = Clock(day + 86400 - 100)  # 100 s before the next one
    lim, key = Limiter(clock), Key("k", daily_tokens=50)
    assert lim.admit(key, reserve=5) is None
    lim.finish(key, 5, 49)
    assert lim.admit(key) is None  # 49 < 50
    lim.finish(key, 0, 1)
    r = lim.admit(key)  # 50: refused until midnight UTC
    assert (r.status, r.reason, r.retry_after) == (429, "daily_tokens", 100)
    clock.advance(100)
    assert lim.admit(key) is None


def test_daily_tokens_survive_a_restart_through_the_ledger(tmp_path):
    clock, ledger = Clock(), tmp_path / "keys.json.usage"
    key = Key("k", daily_tokens=100)
    lim = Limiter(clock, ledger)
    assert lim.admit(key) is None
    lim.finish(key, 0, 60)  # saved: a second has not passed since start, so at shutdown
    assert not ledger.exists()
    lim.save()
    clock.advance(2)
    assert lim.admit(key) is None
    lim.finish(key, 0, 40)  # a second has passed since the last save: written now
    assert json.loads(ledger.read_text())["tokens"] == {"k": 100}
    again = Limiter(clock, ledger)  # the server restarted: the day is not fresh
    assert again.admit(key).reason == "daily_tokens"
    clock.advance(86400)
    assert Limiter(clock, ledger).admit(key) is None  # the next UTC day starts at 0


# --- serve --keys, in process (one tiny model for the module) --------------------------------------------------------

class Probe:
    """Wraps the router (inside the keys stage): what each key has in flight, and the most it ever had."""

    def __init__(self, app) -> None:
        self.app = app
        self.in_flight: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.hold: dict[str, threading.Event] = {}  # key name -> its requests wait inside until it is set
        self.charged: dict[str, int] = {}  # usage.total_tokens of the key's ended requests
        self.seen: dict[str, list[int]] = {}  # at each admission: the key's charged tokens then

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        key = scope.get("camelid.key")
        name = key.name if key is not None else None
        if name is None:
            return await self.app(scope, receive, send)
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        self.most[name] = max(self.most.get(name, 0), self.in_flight[name])
        self.seen.setdefault(name, []).append(self.charged.get(name, 0))
        try:
            if name in self.hold:  # wait in a thread: the loop runs on
                await asyncio.get_running_loop().run_in_executor(None, self.hold[name].wait, 60)
            await self.app(scope, receive, send)
        finally:
            self.in_flight[name] -= 1
            usage = scope.get("camelid.record", {}).get("usage") or {}
            self.charged[name] = self.charged.get(name, 0) + usage.get("total_tokens", 0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from starlette.testclient import TestClient

    from camelid.serve import build_state
    from camelid.serve.app import create_app

    root = tmp_path_factory.mktemp("keys")
    model = root / "tiny.gguf"
    write_gguf(model, Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=128),
               byte_level_vocab(), G.Q8_0)
    keys = root / "keys.json"
    write_keys(keys, {})
    clock = Clock()
    state = build_state(str(model), api_key=ADMIN, max_concurrency=4, max_seq_len=128, model_id="tiny", cache_mb=0)
    state.keys = KeyStore(keys, clock)
    app = create_app(state)
    probe = app.router = Probe(app.router)
    with TestClient(app) as client:
        yield Served(client, keys, clock, probe, state)


class Served:
    def __init__(self, client, keys, clock, probe, state) -> None:
        self.client, self.keys, self.clock, self.probe, self.state = client, keys, clock, probe, state

    def key(self, name: str, **options) -> str:
        """A new key in the file, seen by the server (the clock passes the one-second look)."""
        _, secret = add_key(self.keys, name, now=self.clock(), **options)
        self.clock.advance(1.0)
        return secret

    def post(self, path: str, secret: str | None, body: dict | None = None):
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return self.client.post(path, json=body if body is not None else {}, headers=headers)

    def get(self, path: str, secret: str | None):
        return self.client.get(path, headers={"Authorization": f"Bearer {secret}"} if secret else {})


def completion(max_tokens: int = 3, **extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra}


def error_of(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}, err
    return err


def metric(served: Served, line_start: str) -> float:
    text = served.get("/metrics", ADMIN).text
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return found[0] if found else 0.0


def test_401_for_missing_unknown_revoked_and_expired_keys(served):
    s = served
    ok = s.key("u-ok")
    short = s.key("u-short", expires="1h")
    assert s.post("/v1/completions", ok, completion()).status_code == 200
    for secret in (None, "sk-camelid-nope", ok + "x", ADMIN + "x"):
        r = s.post("/v1/completions", secret, completion())
        assert error_of(r, 401, "invalid_api_key")["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert s.post("/v1/completions", ADMIN, completion()).status_code == 200  # --api-key still works, unrestricted
    assert s.get("/health", None).status_code == 200  # no key needed
    revoke_key(s.keys, "u-ok", now=s.clock())
    s.clock.advance(1.0)  # no restart: the next look at the file
    error_of(s.post("/v1/completions", ok, completion()), 401, "revoked_api_key")
    assert s.post("/v1/completions", short, completion()).status_code == 200
    s.clock.advance(3600)
    error_of(s.post("/v1/completions", short, completion()), 401, "expired_api_key")
    assert metric(s, 'camelid_key_auth_failures_total{reason="revoked"}') == 1
    assert metric(s, 'camelid_key_auth_failures_total{reason="expired"}') == 1


def test_403_outside_the_key_s_endpoints_and_models(served):
    s = served
    chat_only = s.key("s-chat", endpoints="chat")
    other_model = s.key("s-other", models="not-tiny")
    tiny = s.key("s-tiny", models="tiny")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert s.post("/v1/chat/completions", chat_only, chat).status_code == 200
    for path in ("/v1/completions", "/tokenize", "/v1/embeddings"):
        err = error_of(s.post(path, chat_only, completion()), 403, "endpoint_not_allowed")
        assert err["type"] == "permission_error"
    error_of(s.get("/v1/models", chat_only), 403, "endpoint_not_allowed")
    error_of(s.get("/metrics", tiny), 403, "endpoint_not_allowed")  # metrics name every key: not in the default set
    assert s.get("/metrics", ADMIN).status_code == 200
    assert "metrics" not in DEFAULT_ENDPOINTS
    err = error_of(s.post("/v1/completions", other_model, completion(model="tiny")), 403, "model_not_allowed")
    assert err["param"] == "model"
    error_of(s.post("/v1/completions", other_model, completion()), 403, "model_not_allowed")  # no model: the default, tiny
    assert s.post("/v1/completions", tiny, completion()).status_code == 200
    assert s.post("/v1/completions", tiny, completion(model="tiny")).status_code == 200
    assert [m["id"] for m in s.get("/v1/models", tiny).json()["data"]] == ["tiny"]
    assert s.get("/v1/models", other_model).json()["data"] == []  # its scope hides the models it may not use
    assert s.get("/v1/models/tiny", other_model).status_code == 404
    assert s.post("/v1/completions", tiny, {"prompt": PROMPT, "temperature": "hot"}).status_code == 400  # the app's own check
    big = {"model": "tiny", "prompt": "x" * (1 << 20)}  # past the body limit: passed on unread, and the app refuses it
    assert s.post("/v1/completions", other_model, big).status_code == 413
    assert metric(s, 'camelid_key_refusals_total{key="s-chat",reason="endpoint"}') == 4


def test_max_tokens_cap(served):
    s = served
    capped = s.key("m-cap", max_tokens=5)
    err = error_of(s.post("/v1/completions", capped, completion(max_tokens=6)), 400, "max_tokens_exceeded")
    assert err["param"] == "max_tokens"
    err = error_of(s.post("/v1/chat/completions", capped, {"messages": [{"role": "user", "content": "hi"}],
                                                             "max_completion_tokens": 6}), 400, "max_tokens_exceeded")
    assert s.post("/v1/completions", capped, completion(max_tokens=5)).status_code == 200
    free = s.post("/v1/completions", ADMIN, {"prompt": PROMPT, "temperature": 0}).json()  # the server's default: the context
    r = s.post("/v1/completions", capped, {"prompt": PROMPT, "temperature": 0})  # no max_tokens: the key's cap
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["usage"]["completion_tokens"] <= 5 < free["usage"]["completion_tokens"] or (
        free["choices"][0]["finish_reason"] == "stop" and free["usage"]["completion_tokens"] <= 5)
    assert got["choices"][0]["text"] == free["choices"][0]["text"][: len(got["choices"][0]["text"])]


def test_rpm_at_the_edge_over_http(served):
    s = served
    secret = s.key("r-3", rpm=3)
    seen = []
    for _ in range(3):  # the Nth passes
        r = s.post("/tokenize", secret, {"content": "hi"})
        assert r.status_code == 200
        seen.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert seen == [2, 1, 0]
    r = s.post("/tokenize", secret, {"content": "hi"})  # the N+1th
    err = error_of(r, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "60"
    s.clock.advance(59.5)
    assert s.post("/tokenize", secret, {"content": "hi"}).headers["retry-after"] == "1"
    s.clock.advance(0.5)
    assert s.post("/tokenize", secret, {"content": "hi"}).status_code == 200
    assert metric(s, 'camelid_key_refusals_total{key="r-3",reason="rpm"}') == 2
    assert metric(s, 'camelid_key_requests_total{key="r-3"}') == 4


def test_tpm_at_the_edge_streams_and_all(served):
    s = served
    secret = s.key("t-1", tpm=10_000)
    first = s.post("/v1/completions", secret, completion(max_tokens=3)).json()["usage"]["total_tokens"]
    t0 = s.clock()
    with s.client.stream("POST", "/v1/completions", json=completion(max_tokens=3, stream=True,
                         stream_options={"include_usage": True}), headers={"Authorization": f"Bearer {secret}"}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = events[-1]["usage"]["total_tokens"]
    assert streamed == first  # greedy, same prompt
    charged = first + streamed

    def set_tpm(n: int) -> None:  # the operator edits the limit; the server reads it without a restart
        keys = read_keys(s.keys)
        keys["t-1"] = dataclasses.replace(keys["t-1"], tpm=n)
        write_keys(s.keys, keys)
        s.clock.advance(1.0)

    set_tpm(charged + 1)
    r = s.post("/v1/completions", secret, completion(max_tokens=1))  # charged < tpm
    assert r.status_code == 200
    charged += r.json()["usage"]["total_tokens"]
    set_tpm(charged)  # charged == tpm: the edge refuses
    r = s.post("/v1/completions", secret, completion())
    error_of(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) == math.ceil(t0 + 60 - s.clock())  # when the first request's tokens age out
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    set_tpm(charged + 1)
    r = s.post("/v1/completions", secret, completion(max_tokens=1))
    assert r.status_code == 200
    assert metric(s, 'camelid_key_tokens_total{key="t-1"}') == charged + r.json()["usage"]["total_tokens"]
    assert metric(s, 'camelid_key_refusals_total{key="t-1",reason="tpm"}') == 1


def test_concurrency_at_the_edge_over_http(served):
    s = served
    secret = s.key("c-2", concurrency=2)
    s.probe.hold["c-2"] = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(s.post, "/v1/completions", secret, completion()) for _ in range(2)]
        deadline = time.monotonic() + 60
        while s.probe.in_flight.get("c-2", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for a condition (two requests held inside), not for time
        r = s.post("/v1/completions", secret, completion())  # the third, while two are in flight
        s.probe.hold["c-2"].set()
        assert [f.result().status_code for f in held] == [200, 200]
    error_of(r, 429, "rate_limit_exceeded")
    assert r.headers["retry-after"] == "1"
    assert s.post("/v1/completions", secret, completion()).status_code == 200  # they ended: room again
    del s.probe.hold["c-2"]


def test_load_several_keys_none_exceeds_its_limits(served):
    """A bounded load (3 keys x 12 requests, 12 at once; the clock stands still, so each window holds them all)."""
    s = served
    limits = {"l-a": {"rpm": 5, "concurrency": 2}, "l-b": {"concurrency": 1, "tpm": 60},
              "l-c": {"rpm": 8, "max_tokens": 2}}
    secrets = {name: s.key(name, **lim) for name, lim in limits.items()}
    jobs = list(enumerate(name for _ in range(12) for name in limits))

    def one(job: tuple[int, str]):
        i, name = job
        r = s.post("/v1/completions", secrets[name], completion(max_tokens=2, stream=i % 2 == 0))
        return name, r.status_code, r.headers.get("retry-after"), r.json() if r.status_code != 200 else None

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, jobs))
    for name, lim in limits.items():
        mine = [r for r in results if r[0] == name]
        ok = [r for r in mine if r[1] == 200]
        refused = [r for r in mine if r[1] != 200]
        assert all(r[1] == 429 and r[2] and r[3]["error"]["code"] == "rate_limit_exceeded" for r in refused), refused
        assert 1 <= len(ok) <= lim.get("rpm", 12)
        if "concurrency" in lim:
            assert s.probe.most[name] <= lim["concurrency"]
        if "tpm" in lim:  # one at a time (concurrency 1): each was admitted with fewer than tpm tokens charged
            assert len(s.probe.seen[name]) == len(ok) and max(s.probe.seen[name]) < lim["tpm"]
        assert metric(s, f'camelid_key_requests_total{{key="{name}"}}') == len(ok)
        refusals = sum(metric(s, f'camelid_key_refusals_total{{key="{name}",reason="{why}"}}')
                       for why in ("rpm", "tpm", "concurrency"))
        assert refusals == len(refused)
    assert s.state.engine.running


# --- the commands and a real server: add, serve --keys, revoke and add while it runs ---------------------------------

def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`camelid ARGV...` in this process (the command's own code path; a subprocess would pay torch's import)."""
    from camelid.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_keys_and_serve_without_restart(tmp_path, capsys):
    import httpx

    from camelid.cli import parse_args
    from camelid.serve import main as serve_main

    keys = tmp_path / "keys.json"
    code, alice, err = cli(capsys, "keys", "add", "alice", "--rpm", "100", "--file", str(keys), "--models", "tiny")
    alice = alice.strip()
    assert code == 0 and alice.startswith("sk-camelid-") and "shown only now" in err and alice not in keys.read_text()
    ops = cli(capsys, "keys", "add", "ops", "--file", str(keys), "--endpoints", "all")[1].strip()
    listing = cli(capsys, "keys", "list", "--json", "--file", str(keys))[1]
    rows = {k["name"]: k for k in json.loads(listing)}
    assert rows["alice"]["rpm"] == 100 and rows["alice"]["status"] == "active" and "hash" not in rows["alice"]
    table = cli(capsys, "keys", "list", "--file", str(keys))[1]
    assert alice not in listing + table and "alice" in table and "rpm=100" in table
    code, _, err = cli(capsys, "keys", "add", "alice", "--file", str(keys))
    assert code == 1 and err.startswith("camelid: error:") and "a key named 'alice' exists" in err
    assert serve_main(parse_args(["serve", "--keys", str(tmp_path / "none.json")])) == 1  # before any model is loaded
    assert "no such key file" in capsys.readouterr().err
    model = tmp_path / "tiny.gguf"
    write_gguf(model, Spec(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, context_length=64),
               byte_level_vocab(), G.F32)
    with running_server(model, "--keys", str(keys), "--model-id", "tiny", "--max-seq-len", "64", "--log-level",
                        "warning", "--cache-mb", "0") as (base, _):
        def status(secret: str) -> tuple[int, str | None]:
            r = httpx.post(base + "/v1/completions", json=completion(max_tokens=1),
                           headers={"Authorization": f"Bearer {secret}"}, timeout=60)
            return r.status_code, r.json().get("error", {}).get("code") if r.status_code != 200 else None

        def eventually(secret: str, want: tuple[int, str | None]) -> None:
            deadline = time.monotonic() + 30
            while (got := status(secret)) != want and time.monotonic() < deadline:
                time.sleep(0.05)  # polling: the server looks at the file at most once a second
            assert got == want

        assert status(alice) == (200, None)
        assert cli(capsys, "keys", "revoke", "alice", "--file", str(keys))[0] == 0
        eventually(alice, (401, "revoked_api_key"))
        bob = cli(capsys, "keys", "add", "bob", "--file", str(keys), "--models", "other")[1].strip()
        eventually(bob, (403, "model_not_allowed"))
        text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {ops}"}).text
        assert 'camelid_key_auth_failures_total{reason="revoked"}' in text
        assert 'camelid_key_refusals_total{key="bob",reason="model"} 1' in text
        assert 'camelid_key_requests_total{key="alice"}' in text
    ledger = json.loads((tmp_path / "keys.json.usage").read_text())  # written at shutdown
    assert ledger["tokens"]["alice"] >= len(PROMPT) + 1 and "bob" not in ledger["tokens"]
    rows = {k["name"]: k for k in json.loads(cli(capsys, "keys", "list", "--json", "--file", str(keys))[1])}
    assert rows["alice"]["tokens_today"] == ledger["tokens"]["alice"] and rows["alice"]["status"] == "revoked"


def test_each_key_reuses_only_its_own_cached_prompts(tmp_path):
    """The prompt cache per key (issue 17): a key's repeat reuses its own blocks; another key's same prompt reuses
    nothing of them; every answer is the same."""
    from starlette.testclient import TestClient

    from camelid.serve import build_state
    from camelid.serve.app import create_app

    model = tmp_path / "tiny.gguf"
    write_gguf(model, Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=128),
               byte_level_vocab(), G.Q8_0)
    keys = tmp_path / "keys.json"
    _, alice = add_key(keys, "alice")
    _, bob = add_key(keys, "bob")
    state = build_state(str(model), max_concurrency=2, max_seq_len=128, model_id="tiny", cache_mb=16)
    state.keys = KeyStore(keys)
    body = {"prompt": "The same long system prompt for every tenant, then a question:", "max_tokens": 4,
            "temperature": 0}
    with TestClient(create_app(state)) as client:
        def ask(secret: str) -> dict:
            r = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200, r.text
            return r.json()

        first, again, other, other_again = ask(alice), ask(alice), ask(bob), ask(bob)
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, again, other, other_again)]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0 and cached[3] > 0, cached
    assert len({r["choices"][0]["text"] for r in (first, again, other, other_again)}) == 1
