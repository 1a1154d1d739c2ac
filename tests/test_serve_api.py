"""The server end to end: a real uvicorn process on loopback, driven by the official `openai` client,
raw HTTP (httpx) for errors and disconnects, and a headless chromium for the web chat page."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import running_server

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

KEY = "test-key-123"
MODEL = "smollm2-135m-instruct"
SLOTS, QUEUE = 4, 2


@pytest.fixture(scope="module")
def server(default_model_path):
    flags = ["--api-key", KEY, "--model-id", MODEL, "--max-concurrency", str(SLOTS), "--max-queue", str(QUEUE),
             "--max-seq-len", "1024", "--max-body-bytes", "65536", "--log-level", "warning", "--reference"]  # fixtures' path
    with running_server(default_model_path, *flags) as (base, proc):
        yield type("Server", (), {"base": base, "proc": proc})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def gauges(server) -> dict[str, float]:
    """Every unlabelled sample of one /metrics response (one snapshot: values read together are consistent)."""
    text = httpx.get(server.base + "/metrics", headers=auth(), timeout=30).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def gauge(server, name: str) -> float:
    values = gauges(server)
    if name not in values:
        raise AssertionError(f"{name} not in /metrics")
    return values[name]


def wait_idle(server, timeout: float = 60) -> None:
    """Until no sequence runs or waits, read from one snapshot (two reads could straddle a queued sequence's
    admission and see it in neither). The timeout is generous: a loaded machine may take seconds to notice a client
    that left; a leak still fails."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        g = gauges(server)
        if g["camelid_running_sequences"] == 0 and g["camelid_queue_depth"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"slots still busy after {timeout} s")


# --- the OpenAI client ---

def test_completion_matches_reference_greedy(client, reference):
    case = reference["greedy"][0]
    out = client.completions.create(model=MODEL, prompt=case["prompt"], temperature=0, max_tokens=len(case["new_ids"]))
    assert out.choices[0].text == case["text"].replace("<|im_end|>", "")
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(case["prompt_ids"]) and out.usage.completion_tokens == len(case["new_ids"])


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert "Paris" in text
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_n_seed_logprobs_stop(client):
    messages = [{"role": "user", "content": "Write a word."}]
    a = client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, n=3, seed=7, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    b = client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, n=3, seed=7, max_tokens=8)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: repeatable
    for c in a.choices:
        for entry in c.logprobs.content:
            tops = [t.logprob for t in entry.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob <= 0
            assert entry.logprob <= tops[0] + 1e-6
    greedy = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6, logprobs=True,
                                            top_logprobs=2)
    for entry in greedy.choices[0].logprobs.content:  # greedy picks the most likely token
        assert entry.token == entry.top_logprobs[0].token
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=30, stop=[" 8"])
    assert stopped.choices[0].finish_reason == "stop" and " 8" not in stopped.choices[0].text
    assert "7" in stopped.choices[0].text


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog"]}},
                   "city": {"type": ["string", "null"]}},
    "required": ["name", "age", "pets"],
}


@pytest.mark.parametrize("max_tokens,temperature", [(48, 0), (48, 1.0), (16, 0.7)])
def test_json_schema_output_parses_and_matches(client, max_tokens, temperature):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=max_tokens,
        temperature=temperature, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    value = json.loads(out.choices[0].message.content)
    assert isinstance(value["name"], str) and type(value["age"]) is int
    assert all(p in ("cat", "dog") for p in value["pets"]) and set(value) <= set(SCHEMA["properties"])
    assert out.usage.completion_tokens <= max_tokens
    obj = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                         max_tokens=max_tokens,
                                         temperature=temperature, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_models_tokenize_detokenize(server, client, reference):
    assert [m.id for m in client.models.list().data] == [MODEL]
    for case in reference["tokenize"][:3]:
        r = httpx.post(server.base + "/tokenize", json={"content": case["text"], "add_special": False}, headers=auth()).json()
        assert r["tokens"] == case["ids_no_special"]
        back = httpx.post(server.base + "/detokenize", json={"tokens": r["tokens"]}, headers=auth()).json()
        assert back["content"] == case["text"]


# --- batching ---

def test_greedy_same_alone_and_beside_others(client):
    prompt = "Once upon a time"
    alone = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20).choices[0].text
    results: dict[int, str] = {}

    def call(i: int, p: str) -> None:
        out = client.completions.create(model=MODEL, prompt=p, temperature=0 if i == 0 else 1.0, max_tokens=20)
        results[i] = out.choices[0].text

    others = [prompt, "The weather today", "In a galaxy far away " * 40, "def main():"]  # one long prompt: chunked prefill
    threads = [threading.Thread(target=call, args=(i, p)) for i, p in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == alone


# --- security and limits ---

def test_api_key_required_except_health(server):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("POST", "/tokenize"), ("POST", "/detokenize")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.base + path, json={}, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base + "/health").status_code == 200
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and "<title>camelid chat</title>" in page.text
    assert "access-control-allow-origin" not in httpx.options(
        server.base + "/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}).headers


BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 7}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"schema": {"type": "object", "anyOf": []}}}},
     400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1500}]}, 400, "messages"),
    ("/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 1500}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1024}, 400, "max_tokens"),  # fits the limit, not the context
    ("/v1/completions", {"prompt": "x" * 70000}, 413, None),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("/v1/nowhere", {}, 404, None),
]


def test_bad_input_gives_openai_errors_and_server_goes_on(server):
    for path, body, status, param in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.base + path, headers={**auth(), "Content-Type": "application/json"}, timeout=30, **kw)
        assert r.status_code == status, (path, body if len(str(body)) < 200 else "...", r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
        assert err["param"] == param, (path, err)
    long = httpx.post(server.base + "/v1/completions", json={"prompt": "word " * 1500}, headers=auth()).json()
    assert long["error"]["code"] == "context_length_exceeded"
    ok = httpx.post(server.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=auth())
    assert ok.status_code == 200 and httpx.get(server.base + "/health").json() == {"status": "ok"}


def test_overflow_gets_429_with_retry_after(server):
    statuses: list[int] = []
    retry: list[str | None] = []
    lock = threading.Lock()
    release = threading.Event()

    def hold() -> None:
        # greedy counting runs to max_tokens (no early end of text): the slot stays taken until the client leaves,
        # however fast or slow the machine is
        body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
            with lock:
                statuses.append(r.status_code)
                retry.append(r.headers.get("retry-after"))
            if r.status_code == 200:
                release.wait(60)  # hold the slot, then leave midway

    threads = [threading.Thread(target=hold) for _ in range(SLOTS + QUEUE + 3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    deadline = time.time() + 300
    while len(statuses) < len(threads) and time.time() < deadline:
        time.sleep(0.1)
    release.set()
    for t in threads:
        t.join()
    assert statuses.count(429) >= 3 and set(statuses) <= {200, 429}, statuses
    assert all(r == "1" for s, r in zip(statuses, retry, strict=True) if s == 429)
    wait_idle(server)


def test_disconnect_frees_the_slot(server):
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 500, "stream": True, "temperature": 0}  # counts on and on
    wait_idle(server)
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["text"], first  # a token, not an error
        # the slot is held while the stream is open. Read a few times: twice in about a dozen loaded runs a single
        # read right after the first token gave 0 (cause not found; see issue 9's closing note); a slot really
        # freed early stays 0 and still fails here, with how the stream went on
        seen = []
        for _ in range(20):
            seen.append(gauges(server)["camelid_running_sequences"])
            if seen[-1] == 1:
                break
            time.sleep(0.25)
        if seen[-1] != 1:
            rest = [line for line in lines if line.startswith("data:")]  # the same iterator: the stream goes on
            raise AssertionError(f"running {seen} after {first[:300]}; then {len(rest)} events, the last {rest[-3:]}")
    wait_idle(server)
    # a non-streaming client that gives up
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base + "/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 500, "temperature": 0},
                   headers=auth(), timeout=1.0)
    wait_idle(server)


def test_metrics_prometheus_text(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    text = httpx.get(server.base + "/metrics", headers=auth()).text
    assert 'camelid_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'camelid_request_latency_seconds_bucket{le="+Inf"}' in text
    assert "# TYPE camelid_queue_depth gauge" in text and "camelid_completion_tokens_total" in text
    tokens = [line for line in text.splitlines() if line.startswith("camelid_completion_tokens_total ")]
    assert float(tokens[0].split()[1]) >= 3


def test_idle_keep_alive_connection_outlives_client_pools(server):
    """The server keeps an idle connection open longer than clients keep it in their pools (httpx/openai: 5 s), so
    a client never reuses a connection the server is closing (the RemoteProtocolError race with uvicorn's 5 s)."""
    host, port = server.base.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode()

    def roundtrip(sock: socket.socket) -> bytes:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the connection: {data!r}"
            data += chunk
        return data

    with socket.create_connection((host, int(port)), timeout=30) as sock:
        assert roundtrip(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6.5)  # idle past httpx's pool expiry (and uvicorn's default keep-alive)
        sock.setblocking(False)
        try:
            assert sock.recv(1, socket.MSG_PEEK) != b"", "the server closed an idle connection within 6.5 s"
        except BlockingIOError:
            pass  # open, nothing to read: as it should be
        sock.setblocking(True)
        assert roundtrip(sock).startswith(b"HTTP/1.1 200")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_load_many_streams_with_disconnects(server):
    """4 clients x 8 streams each (fixed count), every third leaves after its first event; 180 s at most."""
    errors: list[str] = []

    def worker(w: int) -> None:
        for i in range(8):
            body = {"prompt": f"Story {w}-{i}:", "max_tokens": 12, "stream": True, "temperature": 0.8}
            try:
                with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.read()[:200]!r}")
                        continue
                    data = []
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            data.append(line)
                            if (w + i) % 3 == 0:
                                break  # leave midway
                    if (w + i) % 3 and data[-1] != "data: [DONE]":
                        errors.append("stream ended without [DONE]")
            except httpx.HTTPError as e:
                errors.append(repr(e))

    def round_() -> float:
        start = time.time()
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(SLOTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads), "load test still running after 600 s"
        return time.time() - start

    round_()  # warm up: allocator and caches settle
    wait_idle(server)
    before = rss_kb(server.proc.pid)
    round_()
    wait_idle(server)
    after = rss_kb(server.proc.pid)
    assert not errors, errors[:5]
    assert after - before < 64 * 1024, f"RSS grew {before} -> {after} kB"
    assert httpx.get(server.base + "/health").status_code == 200


# the web chat page in a real browser: tests/test_serve_web.py
