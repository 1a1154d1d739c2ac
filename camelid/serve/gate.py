"""The server's first stage: who is asking (the API key) and whether they may, now (scopes and limits).

    401  no key, an unknown, revoked or expired key
    403  an endpoint or a model outside the key's scopes
    400  max_tokens over the key's per-request cap (a request without max_tokens gets the cap)
    429  over a limit, with Retry-After (seconds until the request would pass) and OpenAI's x-ratelimit-* headers

Limits of a key, each over its own window (`clock` is injectable, so tests step time instead of sleeping):
    rpm           requests admitted in the last 60 s (sliding): the Nth passes, the N+1th waits for the oldest to age out
    tpm           tokens in the last 60 s: a request is admitted while the key's charged tokens (usage.total_tokens of
                  requests that ended) plus the max_tokens reserved by its requests in flight are under N (a minute can
                  pass N by the last admitted request and the prompts in flight: prompts are counted once tokenized)
    concurrency   requests of the key in flight at once
    daily_tokens  as tpm, over the UTC calendar day (Retry-After: until the next UTC midnight); the day's counts
                  are kept in a ledger file beside the key file (KEYS.usage, written atomically at most once a second
                  and at shutdown), so a restart does not hand out a fresh day (a kill loses at most the last second)
The limiter lives in the event loop (one thread), so it takes no locks; its state is per key name and survives
reloads of the key file.
"""

from __future__ import annotations

import hmac
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .keys import DEFAULT_ENDPOINTS, DEFAULT_KEY, Key, KeyStore, atomic_write, endpoint_of, iso

WINDOW = 60.0
OPEN_PATHS = {"/health", "/"}  # no key needed: liveness, and the static chat page (it holds no data)
BODY_ENDPOINTS = {"chat", "completions", "embeddings", "rerank", "moderations", "tokenize"}  # a JSON body naming a model


@dataclass
class Refusal:
    status: int
    message: str
    code: str
    type: str
    reason: str  # for the metrics: unknown, revoked, expired, endpoint, model, max_tokens, rpm, tpm, concurrency, daily_tokens
    retry_after: int | None = None
    param: str | None = None


@dataclass
class _Usage:
    """What one key has used: admitted request times, charged tokens with their times, what is in flight."""

    requests: deque = field(default_factory=deque)  # admission times (last WINDOW s)
    tokens: deque = field(default_factory=deque)  # (time, tokens) charged (last WINDOW s)
    window_tokens: int = 0
    in_flight: int = 0
    reserved: int = 0  # max_tokens of the requests in flight
    day: int = -1  # UTC day number of day_tokens
    day_tokens: int = 0


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))


class Limiter:
    """Per-key rpm, tpm, concurrency and daily-token accounting; ledger: the file the day's token counts are kept in."""

    def __init__(self, clock: Callable[[], float] = time.time, ledger: str | Path | None = None,
                 save_every: float = 1.0) -> None:
        self.clock, self.ledger, self.save_every = clock, Path(ledger) if ledger else None, save_every
        self.usage: dict[str, _Usage] = {}
        self._dirty, self._saved_at, self._warned = False, clock(), False
        if self.ledger is not None:  # today's counts from before a restart
            day = int(clock() // 86400)
            self.usage = {name: _Usage(day=day, day_tokens=n) for name, n in read_ledger(self.ledger, day).items()}

    def save(self) -> None:
        """Write the day's token counts to the ledger (atomically), if they changed; a failure is one warning."""
        if self.ledger is None or not self._dirty:
            return
        now = self.clock()
        day = int(now // 86400)
        tokens = {name: u.day_tokens for name, u in self.usage.items() if u.day == day and u.day_tokens}
        self._dirty, self._saved_at = False, now
        try:
            atomic_write(self.ledger, json.dumps({"version": 1, "date": iso(day * 86400)[:10], "day": day,
                                                  "tokens": tokens}, indent=1) + "\n")
        except OSError as e:
            if not self._warned:
                self._warned = True
                print(f"camelid: warning: cannot write the key usage ledger {self.ledger} ({e.strerror or e}): the day's "
                      "token counts will start again if the server restarts", file=sys.stderr, flush=True)

    def _aged(self, key: Key, now: float) -> _Usage:
        u = self.usage.setdefault(key.name, _Usage())
        while u.requests and u.requests[0] <= now - WINDOW:
            u.requests.popleft()
        while u.tokens and u.tokens[0][0] <= now - WINDOW:
            u.window_tokens -= u.tokens.popleft()[1]
        day = int(now // 86400)
        if day != u.day:
            u.day, u.day_tokens = day, 0
        return u

    def admit(self, key: Key, reserve: int = 0) -> Refusal | None:
        """Admit a request of `key` that may generate up to `reserve` tokens (None: admitted; call finish() once it
        has ended), or why not."""
        now = self.clock()
        u = self._aged(key, now)

        def over(limit: str, n: int, what: str, retry: float) -> Refusal:
            return Refusal(429, f"the key {key.name!r} is over its limit of {n} {what}; retry after {_ceil(retry)} s",
                           "rate_limit_exceeded", "rate_limit_error", limit, _ceil(retry))

        if key.concurrency is not None and u.in_flight >= key.concurrency:
            return over("concurrency", key.concurrency, "requests at once", 1)
        if key.rpm is not None and len(u.requests) >= key.rpm:
            return over("rpm", key.rpm, "requests a minute", u.requests[len(u.requests) - key.rpm] + WINDOW - now)
        if key.tpm is not None and u.window_tokens + u.reserved >= key.tpm:
            excess, retry = u.window_tokens + u.reserved - key.tpm, 1.0
            for t, n in u.tokens:  # the time by which enough charged tokens have aged out
                excess -= n
                retry = t + WINDOW - now
                if excess < 0:
                    break
            return over("tpm", key.tpm, "tokens a minute", retry)
        if key.daily_tokens is not None and u.day_tokens + u.reserved >= key.daily_tokens:
            return over("daily_tokens", key.daily_tokens, "tokens a day (UTC)", (u.day + 1) * 86400 - now)
        u.requests.append(now)
        u.in_flight += 1
        u.reserved += reserve
        return None

    def finish(self, key: Key, reserve: int, tokens: int) -> None:
        """A request admitted with `reserve` has ended, having used `tokens` (usage.total_tokens)."""
        now = self.clock()
        u = self._aged(key, now)
        u.in_flight -= 1
        u.reserved -= reserve
        if tokens > 0:
            u.tokens.append((now, tokens))
            u.window_tokens += tokens
            u.day_tokens += tokens
            self._dirty = True
            if now - self._saved_at >= self.save_every:
                self.save()

    def headers(self, key: Key) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers for the key's per-minute limits."""
        now = self.clock()
        u = self._aged(key, now)
        out = []
        if key.rpm is not None:
            reset = u.requests[0] + WINDOW - now if len(u.requests) >= key.rpm and u.requests else 0
            out += [("limit-requests", key.rpm), ("remaining-requests", max(0, key.rpm - len(u.requests))),
                    ("reset-requests", f"{reset:.0f}s")]
        if key.tpm is not None:
            reset = u.tokens[0][0] + WINDOW - now if u.tokens else 0
            out += [("limit-tokens", key.tpm), ("remaining-tokens", max(0, key.tpm - u.window_tokens - u.reserved)),
                    ("reset-tokens", f"{reset:.0f}s")]
        return [(f"x-ratelimit-{k}".encode(), str(v).encode()) for k, v in out]


def read_ledger(path: Path, day: int) -> dict[str, int]:
    """{key name: tokens} charged on UTC day number `day`, from a ledger file (empty: none, another day, unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"camelid: warning: cannot read the key usage ledger {path} ({e}); the day's token counts start at 0",
              file=sys.stderr, flush=True)
        return {}
    if not isinstance(data, dict) or data.get("day") != day or not isinstance(data.get("tokens"), dict):
        return {}
    return {name: n for name, n in data["tokens"].items() if isinstance(n, int) and not isinstance(n, bool) and n > 0}


async def _send_error(send, r: Refusal, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": {"message": r.message, "type": r.type, "param": r.param, "code": r.code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if r.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if r.retry_after is not None:
        headers.append((b"retry-after", str(r.retry_after).encode()))
    await send({"type": "http.response.start", "status": r.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bearer(scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _requested_tokens(body: dict, endpoint: str) -> tuple[int | None, int]:
    """(max new tokens asked per choice or None when not said, choices) of a chat or completions body."""
    asked = body.get("max_completion_tokens") if endpoint == "chat" else None
    if asked is None:
        asked = body.get("max_tokens")
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return (asked if isinstance(asked, int) and not isinstance(asked, bool) else None), n


class KeysMiddleware:
    """Authenticate (`Authorization: Bearer KEY`), check the key's scopes, admit it under its limits, and charge its
    usage when the response has ended (pure ASGI: streams pass untouched).

    api_key: the single unrestricted key of --api-key (the key named "default"); store: the key file (--keys);
    either, both or neither. The matched Key is put at scope["camelid.key"] for the later stages (policy reads its
    categories, the audit log its name); the request record at scope["camelid.record"] is where the endpoints leave
    their usage."""

    def __init__(self, app, api_key: str | None = None, store: KeyStore | None = None, metrics=None,
                 default_model: str = "", max_body_bytes: int = 1 << 20, limiter: Limiter | None = None) -> None:
        self.app, self.api_key, self.store, self.metrics = app, api_key, store, metrics
        self.default_model, self.max_body_bytes = default_model, max_body_bytes
        self.limiter = limiter or Limiter(store.clock if store is not None else time.time)

    def _count(self, counter: str, **labels: str) -> None:
        if self.metrics is not None and hasattr(self.metrics, counter):
            getattr(self.metrics, counter).inc(**labels)

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or not (self.api_key or self.store) or scope["path"] in OPEN_PATHS
                or scope["method"] == "OPTIONS"):
            return await self.app(scope, receive, send)
        token = _bearer(scope)
        key, refusal = self._authenticate(token)
        if refusal is not None:
            self._count("key_auth_failures", reason=refusal.reason)
            return await _send_error(send, refusal)
        scope["camelid.key"] = key
        if key is DEFAULT_KEY:
            return await self.app(scope, receive, send)
        endpoint = endpoint_of(scope["path"])
        if endpoint is not None and not key.allows_endpoint(endpoint):
            allowed = ", ".join(key.endpoints if key.endpoints is not None else DEFAULT_ENDPOINTS)
            refusal = Refusal(403, f"the key {key.name!r} may not use {scope['path']} (its endpoints: {allowed})",
                              "endpoint_not_allowed", "permission_error", "endpoint")
            self._count("key_refusals", key=key.name, reason="endpoint")
            return await _send_error(send, refusal)
        reserve = 0
        if endpoint in BODY_ENDPOINTS and scope["method"] == "POST":
            receive, refusal, reserve = await self._check_body(scope, receive, key, endpoint)
            if refusal is not None:
                self._count("key_refusals", key=key.name, reason=refusal.reason)
                return await _send_error(send, refusal)
        refusal = self.limiter.admit(key, reserve)
        if refusal is not None:
            self._count("key_refusals", key=key.name, reason=refusal.reason)
            return await _send_error(send, refusal, self.limiter.headers(key))
        self._count("key_requests", key=key.name)
        record = scope.setdefault("camelid.record", {})  # the endpoints leave their usage here

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.limiter.headers(key)]}
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        finally:
            usage = record.get("usage") if isinstance(record, dict) else None
            total = usage.get("total_tokens") if isinstance(usage, dict) else None
            used = total if isinstance(total, int) and total > 0 else 0
            self.limiter.finish(key, reserve, used)
            if used and self.metrics is not None and hasattr(self.metrics, "key_tokens"):
                self.metrics.key_tokens.inc(used, key=key.name)

    def _authenticate(self, token: str | None) -> tuple[Key | None, Refusal | None]:
        def unauthorized(message: str, code: str, reason: str) -> tuple[None, Refusal]:
            return None, Refusal(401, message, code, "authentication_error", reason)

        if token is None:
            return unauthorized("a valid API key is needed: send 'Authorization: Bearer KEY'", "invalid_api_key", "missing")
        if self.api_key and hmac.compare_digest(token.encode(), self.api_key.encode()):
            return DEFAULT_KEY, None
        key = self.store.lookup(token) if self.store is not None else None
        if key is None:
            return unauthorized("the API key is not valid: send 'Authorization: Bearer KEY' with a key this server "
                                "knows", "invalid_api_key", "unknown")
        status = key.status(self.limiter.clock())
        if status == "revoked":
            return unauthorized(f"the API key {key.name!r} has been revoked", "revoked_api_key", "revoked")
        if status == "expired":
            return unauthorized(f"the API key {key.name!r} has expired", "expired_api_key", "expired")
        return key, None

    async def _check_body(self, scope, receive, key: Key, endpoint: str):
        """Read the body (up to the server's size limit) to check its model and max_tokens against the key;
        (a receive that replays it, a refusal or None, the tokens to reserve). A body the app will reject anyway (too
        large, not JSON) is passed on as it is: the app answers it, having done nothing."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                chunks.append(message)
                break
            chunks.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        if more or size > self.max_body_bytes or (chunks and chunks[-1]["type"] != "http.request"):
            return _replay(chunks, receive), None, 0
        raw = b"".join(m.get("body", b"") for m in chunks)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return _replay(chunks, receive), None, 0
        model = body.get("model")
        model = self.default_model if model is None else model
        if isinstance(model, str) and not key.allows_model(model):
            return None, Refusal(403, f"the key {key.name!r} may not use the model {model!r} (its models: "
                                      f"{', '.join(key.models or ())})", "model_not_allowed", "permission_error", "model",
                                 param="model"), 0
        if endpoint not in ("chat", "completions"):
            return _replay(chunks, receive), None, 0
        asked, n = _requested_tokens(body, endpoint)
        if key.max_tokens is not None:
            if asked is not None and asked > key.max_tokens:
                return None, Refusal(400, f"the key {key.name!r} allows at most {key.max_tokens} new tokens a request; "
                                          f"this one asks {asked}", "max_tokens_exceeded", "invalid_request_error",
                                     "max_tokens", param="max_tokens"), 0
            if asked is None:  # the server's default (the rest of the context) would pass the key's cap
                body["max_tokens"] = asked = key.max_tokens
                raw = json.dumps(body).encode()
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                scope["headers"].append((b"content-length", str(len(raw)).encode()))
                chunks = [{"type": "http.request", "body": raw, "more_body": False}]
        return _replay(chunks, receive), None, (asked or 0) * n


def _replay(chunks: list[dict], receive):
    """A receive that gives back the messages already read, then reads on."""
    pending = deque(chunks)

    async def replayed():
        return pending.popleft() if pending else await receive()

    return replayed
