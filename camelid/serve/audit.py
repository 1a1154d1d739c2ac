"""The audit stage of the server: one record per request in the audit log (camelid/audit.py), written when the
request ends, before its last byte is sent (so a client that has its whole answer has its record on disk).

Pure ASGI middleware, outside the keys stage: it sees every request, refused ones included. It creates
`scope["camelid.record"]` (app.record() fills it) and reads it, and the key the keys stage put in
`scope["camelid.key"]`, when the response ends: after the last body message of a stream, or when the app returns
or raises without one (the client left: `client_gone`). Each response carries `X-Request-Id`, the record's `id`.
On the lifespan's shutdown it writes the final checkpoint; while serving, records are signed at most
CHECKPOINT_SECONDS after they are written. When the log cannot be written the server answers 503 to every request
but /health: it never serves unlogged.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time

from ..audit import CHECKPOINT_SECONDS, AuditError, AuditLog, now_iso

UNLOGGED = {"/health", "/", "/metrics"}  # liveness, the static page and the scrape carry no request data
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def audit_fields(log: AuditLog, scope: dict, status: int | None, latency: float, rid: str, stream: bool,
                 client_gone: bool, error: str | None) -> dict:
    """The record of one finished request, from its scope (what app.record() and the keys stage left there)."""
    rec = scope.get("camelid.record") or {}
    key = scope.get("camelid.key")
    usage = rec.get("usage") if isinstance(rec.get("usage"), dict) else None
    fields = {"time": now_iso(), "id": rid, "key": getattr(key, "name", None), "method": scope.get("method"),
              "endpoint": scope.get("path"), "model": rec.get("model"), "status": status,
              "latency_ms": round(latency * 1000, 1), "stream": stream,
              "tokens": {k: usage[k] for k in TOKEN_FIELDS if k in usage} if usage else None,
              "finish_reason": rec.get("finish_reason"), "verdicts": rec.get("verdicts") or []}
    for name in ("prompt", "answer"):
        text = rec.get(name)
        text = text() if callable(text) else text  # app.record() leaves the prompt to be decoded here
        if isinstance(text, str):
            fields[f"{name}_hmac"] = log.key.keyed_hash(text)
            if log.text:
                fields[name] = text
    if client_gone:
        fields["client_gone"] = True
    if error:
        fields["error"] = error
    return fields


class AuditMiddleware:
    """Writes one audit record per HTTP request (but UNLOGGED paths) to `log`."""

    def __init__(self, app, log: AuditLog) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        if scope["type"] != "http" or scope["path"] in UNLOGGED:
            return await self.app(scope, receive, send)
        if self.log.failed:
            return await _unavailable(self.log.failed, scope, receive, send)
        scope["camelid.record"] = {}
        rid = "req-" + secrets.token_hex(12)
        start = time.perf_counter()
        state = {"status": None, "stream": False, "written": False, "gone": False}

        def write(error: str | None = None) -> None:
            if state["written"]:
                return
            state["written"] = True
            fields = audit_fields(self.log, scope, state["status"], time.perf_counter() - start, rid, state["stream"],
                                  state["gone"], error)
            try:
                self.log.record(fields)
            except AuditError as e:
                print(f"camelid: error: {e}; the server refuses requests until it can write its audit log",
                      file=sys.stderr)

        async def watched_receive():
            message = await receive()
            if message["type"] == "http.disconnect" and not state["written"]:
                state["gone"] = True
            return message

        async def audited_send(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = list(message.get("headers", []))
                state["stream"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                      for k, v in headers)
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["gone"] = False  # the answer is complete: a disconnect now is the client closing normally
                write()  # before the last byte goes out
            await send(message)

        try:
            await self.app(scope, watched_receive, audited_send)
        except BaseException as e:
            if state["status"] is None:
                state["status"] = 500
            if isinstance(e, (asyncio.CancelledError, OSError)) or type(e).__name__ == "ClientDisconnect":
                state["gone"] = True
                write()
            else:
                write(error=type(e).__name__)
            raise
        finally:
            if not state["written"]:
                state["gone"] = True  # the app returned without finishing its answer: the client left
                write()

    async def _lifespan(self, scope, receive, send) -> None:
        """Sign pending records every CHECKPOINT_SECONDS while serving; the final checkpoint at shutdown."""
        ticker: asyncio.Task | None = None

        async def tick() -> None:
            while True:
                await asyncio.sleep(CHECKPOINT_SECONDS / 4)
                if self.log.due():
                    try:
                        self.log.checkpoint(if_pending=True)
                    except AuditError as e:
                        print(f"camelid: error: {e}", file=sys.stderr)

        async def lifespan_send(message) -> None:
            nonlocal ticker
            if message["type"] == "lifespan.startup.complete":
                ticker = asyncio.create_task(tick())
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                if ticker is not None:
                    ticker.cancel()
                self.log.close()
            await send(message)

        await self.app(scope, receive, lifespan_send)


def add_metrics(metrics, log: AuditLog) -> None:
    """The audit log's families on /metrics: records written, records not yet signed, and whether it failed."""
    from .metrics import Gauge, ReadCounter

    metrics.gauges += [
        ReadCounter("camelid_audit_records_total", "request records written to the audit log", lambda: log.records),
        Gauge("camelid_audit_unsigned_records", "audit log lines written since its last signed checkpoint",
              lambda: log.since_checkpoint),
        Gauge("camelid_audit_failed", "1 when the audit log cannot be written (the server then refuses requests)",
              lambda: int(bool(log.failed))),
    ]


async def _unavailable(why: str, scope, receive, send) -> None:
    body = json.dumps({"error": {"message": f"the server cannot write its audit log, so it serves nothing: {why}",
                                 "type": "server_error", "param": None, "code": "audit_unavailable"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"30")]})
    await send({"type": "http.response.body", "body": body})
