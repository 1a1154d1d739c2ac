"""`serve --audit-log`: one record per request (its fields checked against what the client got), text only with
--audit-text, refusals logged too, the final checkpoint at shutdown; and a bounded load with SIGKILL mid-load,
after which every request the client saw end has exactly one record and the log verifies up to where it stops."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass
from datetime import datetime

import httpx
import pytest
from conftest import running_server
from gguf import GGMLQuantizationType as G
from gguf_factory import Spec, byte_level_vocab, write_gguf

from camelid.audit import AuditLog, keyed_hash, load_key, verify

KEY = "sekret-key"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit-model") / "tiny.gguf"
    write_gguf(path, Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, tied=True), byte_level_vocab(),
               G.Q8_0, chat_template=CHATML)
    return path


def records(path) -> list[dict]:
    return [r for r in map(json.loads, path.read_bytes().splitlines()) if r["type"] == "request"]


@dataclass(frozen=True)
class Key:
    name: str
    categories: tuple[str, ...] | None = None


class MatchedKey:
    """Stands in for the keys stage where it is not there yet (the contract: with --api-key alone, scope["camelid.key"]
    is a key named "default"); innermost, so only requests the authentication let through carry it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope.setdefault("camelid.key", Key("default"))
        await self.app(scope, receive, send)


def _serve(tiny, log: AuditLog):
    from starlette.middleware import Middleware
    from starlette.testclient import TestClient

    from camelid.serve import build_state
    from camelid.serve.app import create_app

    state = build_state(str(tiny), api_key=KEY, max_concurrency=2, max_seq_len=128, model_id="tiny", cache_mb=0)
    app = create_app(state, audit=log)
    app.user_middleware.append(Middleware(MatchedKey))  # the innermost layer (the stack is built on first use)
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


def sse_text(lines) -> tuple[str, list, dict | None]:
    """(the streamed text, the finish reasons, the usage) of an SSE completion stream."""
    text, finish, usage = [], [], None
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        for c in event["choices"]:
            text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
            if c.get("finish_reason"):
                finish.append(c["finish_reason"])
    return "".join(text), finish, usage


def test_one_record_per_request_with_what_the_client_got(tiny, tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, checkpoint_every=1000)
    secret = "the zebra password is hunter2"
    with _serve(tiny, log) as client:
        got = []  # (X-Request-Id, status, endpoint, answer text, finish reasons, usage, stream)

        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": secret}],
                                                      "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        got.append((r.headers["x-request-id"], 200, "/v1/chat/completions", body["choices"][0]["message"]["content"],
                    [body["choices"][0]["finish_reason"]], body["usage"], False))

        body_req = {"prompt": secret, "max_tokens": 5, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/completions", json=body_req) as r:
            text, finish, usage = sse_text(r.iter_lines())
            got.append((r.headers["x-request-id"], 200, "/v1/completions", text, finish, usage, True))

        with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                 "max_tokens": 4, "stream": True, "n": 2}) as r:
            text, finish, _ = sse_text(r.iter_lines())
            got.append((r.headers["x-request-id"], 200, "/v1/chat/completions", None, finish, None, True))

        r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        got.append((r.headers["x-request-id"], 404, "/v1/completions", None, None, None, False))
        r = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        got.append((r.headers["x-request-id"], 400, "/v1/completions", None, None, None, False))
        r = client.post("/tokenize", json={"content": "abc"}, headers={"Authorization": "Bearer wrong"})
        got.append((r.headers["x-request-id"], 401, "/tokenize", None, None, None, False))
        assert client.get("/health").status_code == 200  # liveness probes are not logged
        assert client.get("/v1/models").status_code == 200
        got.append((None, 200, "/v1/models", None, None, None, False))

    recs = records(path)
    assert len(recs) == len(got)
    hmac_key = load_key(tmp_path / "audit.log.key").hmac_key
    for rec, (rid, status, endpoint, answer, finish, usage, stream) in zip(recs, got):
        assert (rec["status"], rec["endpoint"], rec["method"], rec["stream"]) == \
            (status, endpoint, "GET" if endpoint == "/v1/models" else "POST", stream)
        assert rec["key"] == (None if status == 401 else "default")
        assert rec["latency_ms"] >= 0 and rec["time"].endswith("Z")
        if rid is not None:
            assert rec["id"] == rid
        if answer is not None:
            assert rec["answer_hmac"] == keyed_hash(hmac_key, answer)
        if finish is not None:
            assert rec["finish_reason"] == finish and rec["model"] == "tiny"
        if usage is not None:
            assert rec["tokens"] == {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        assert "prompt" not in rec and "answer" not in rec
    assert recs[2]["answer_hmac"].startswith("hmac-sha256:") and len(recs[2]["finish_reason"]) == 2
    assert b"zebra" not in path.read_bytes()  # no text without --audit-text
    rep = verify(path)
    assert rep.status == "ok" and rep.closed and rep.records == len(got)  # the shutdown wrote the final checkpoint


def test_audit_text_stores_prompt_and_answer(tiny, tmp_path):
    path = tmp_path / "audit.log"
    with _serve(tiny, AuditLog(path, text=True)) as client:
        r = client.post("/v1/completions", json={"prompt": "Once upon a zebra", "max_tokens": 4, "temperature": 0})
        answer = r.json()["choices"][0]["text"]
    (rec,) = records(path)
    key = load_key(tmp_path / "audit.log.key")
    assert "Once upon a zebra" in rec["prompt"] and rec["answer"] == answer
    assert rec["prompt_hmac"] == key.keyed_hash(rec["prompt"]) and rec["answer_hmac"] == key.keyed_hash(answer)


def test_pending_records_are_signed_while_serving_and_counted_on_metrics(tiny, tmp_path, monkeypatch):
    import time

    import camelid.audit
    import camelid.serve.audit

    monkeypatch.setattr(camelid.audit, "CHECKPOINT_SECONDS", 0.2)
    monkeypatch.setattr(camelid.serve.audit, "CHECKPOINT_SECONDS", 0.2)
    path = tmp_path / "audit.log"
    with _serve(tiny, AuditLog(path, fsync="always")) as client:
        for _ in range(2):
            assert client.post("/tokenize", json={"content": "a"}).status_code == 200
        deadline = time.time() + 60
        while verify(path).status != "ok" and time.time() < deadline:  # the ticker signs the two records
            time.sleep(0.05)
        rep = verify(path)
        assert rep.status == "ok" and not rep.closed and rep.records == 2
        text = client.get("/metrics").text
        assert "camelid_audit_records_total 2" in text and "camelid_audit_unsigned_records 0" in text
        assert "camelid_audit_failed 0" in text


def test_an_unwritable_log_stops_the_server(tiny, tmp_path):
    """A log that cannot be written: the server refuses (503) rather than serve unlogged."""
    import os

    path = tmp_path / "audit.log"
    log = AuditLog(path)
    with _serve(tiny, log) as client:
        assert client.post("/tokenize", json={"content": "a"}).status_code == 200
        os.close(log.fd)
        log.fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF, as a lost disk would
        client.post("/tokenize", json={"content": "b"})
        r = client.post("/tokenize", json={"content": "c"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert client.get("/health").status_code == 200
        assert "camelid_audit_failed 1" in client.get("/metrics").text


@pytest.mark.slow
def test_sigkill_mid_load_loses_no_record(tiny, tmp_path):
    """4 clients x 8 requests (chat and completions, streamed or not, some leaving midway, some with a wrong key),
    each client with a key of its own from a --keys file (one limited to 3 requests a minute) beside --api-key;
    SIGKILL once half have ended. Every request the client saw end has exactly one record, with its status and its
    key's name; no key passed its limit; the log verifies (no tampering) up to where it stops; a restart continues
    it and a clean stop signs it to the end."""
    from camelid.serve.keys import add_key

    path = tmp_path / "audit.log"
    keys_file = tmp_path / "keys.json"
    secrets_of = {"default": KEY}
    for name, limits in (("alice", {"rpm": 3}), ("bob", {}), ("carol", {"concurrency": 2})):
        _, secrets_of[name] = add_key(keys_file, name, **limits)
    owner = ["alice", "bob", "carol", "default"]  # worker w's key
    flags = ("--api-key", KEY, "--keys", str(keys_file), "--audit-log", str(path), "--audit-checkpoint", "5",
             "--max-concurrency", "4", "--max-seq-len", "128", "--cache-mb", "0", "--log-level", "warning")
    used: dict[str, str | None] = {}  # X-Request-Id -> the key name the client sent (None: a wrong key)
    left: list[str] = []
    ended: dict[str, int] = {}  # X-Request-Id -> status, for every response the client received to its end
    lock = threading.Lock()
    half = threading.Event()
    total = 32
    with running_server(tiny, *flags) as (base, proc):

        def worker(w: int) -> None:
            for i in range(total // 4):
                kind = (w + i) % 4
                leaves = kind == 3 and i % 2 == 0  # a streamed chat whose client leaves after the first event
                wrong = (w * 8 + i) % 7 == 3 and not leaves
                headers = {"Authorization": f"Bearer {'wrong' if wrong else secrets_of[owner[w]]}"}
                body = {"max_tokens": 64 if leaves else 8, "temperature": 0.7, "seed": w * 100 + i, "stream": kind >= 2}
                if kind % 2:
                    body["messages"] = [{"role": "user", "content": f"client {w} turn {i}"}]
                    url = base + "/v1/chat/completions"
                else:
                    body["prompt"] = f"client {w} story {i}:"
                    url = base + "/v1/completions"
                try:
                    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
                        rid = r.headers.get("x-request-id")
                        used[rid] = None if wrong else owner[w]
                        for n, _ in enumerate(r.iter_lines()):
                            if leaves and n == 1:
                                left.append(rid)
                                rid = None  # it never saw its response end
                                break
                        if rid is not None:
                            with lock:
                                ended[rid] = r.status_code
                                if len(ended) >= total // 2:
                                    half.set()
                except httpx.HTTPError:
                    return  # the server is gone

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        assert half.wait(300), "half the requests did not end in 300 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)

    recs = records(path)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a request has more than one record"
    by_id = {r["id"]: r for r in recs}
    missing = [rid for rid in ended if rid not in by_id]
    assert not missing, f"{len(missing)} requests that ended at the client have no record"
    assert all(by_id[rid]["status"] == status for rid, status in ended.items())
    assert 401 in ended.values() and 200 in ended.values()
    assert all(r["key"] == used[r["id"]] for r in recs if r["id"] in used and r["status"] != 401)
    assert all(r["key"] is None for r in recs if r["status"] == 401)
    # alice's rpm 3: no four of her admitted requests started within a minute (start = end - latency; 2 s of slack
    # for the time between the limiter's admission and the audit stage's clock), and a fourth in a minute was refused
    starts = sorted(datetime.fromisoformat(r["time"]).timestamp() - r["latency_ms"] / 1000
                    for r in recs if r["key"] == "alice" and r["status"] != 429)
    assert all(b - a > 58 for a, b in zip(starts, starts[3:])), starts
    alice = [r["status"] for r in recs if r["key"] == "alice"]
    assert len(alice) <= 3 or 429 in alice or starts[-1] - starts[0] > 58, alice
    assert len(ended) >= total // 2
    rep = verify(path)
    assert all(by_id[rid]["status"] == 200 and by_id[rid]["stream"] for rid in left if rid in by_id)
    assert rep.bad_line is None and not rep.closed, rep.to_dict()
    assert rep.status in ("ok", "unproven") and rep.records == len(recs)

    with running_server(tiny, *flags) as (base, proc):  # a restart appends to the same chain
        r = httpx.post(base + "/v1/completions", json={"prompt": "again", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        proc.send_signal(signal.SIGTERM)  # a clean stop: the final checkpoint
        proc.wait(60)
    rep = verify(path)
    assert rep.status == "ok" and rep.closed, rep.to_dict()
    assert records(path)[-1]["id"] == rid
