"""The HTTP API (OpenAI-compatible) as a Starlette app over an Engine."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, replace
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import chat as chat_mod
from ..textstream import TextStream
from ..tokenizer import Tokenizer
from . import policy as policy_stage
from . import tools as tool_stage
from .constrained import JsonConstraint
from .engine import Engine, EngineStoppedError, Finish, QueueFullError, Token, make_sequence
from .gate import KeysMiddleware, Limiter
from .keys import KeyStore
from .metrics import Metrics
from .params import ApiError, GenParams, Limits, check_fits, messages_of, parse_common, prompt_of
from .tools import ChatOutput, ToolRequest


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Tokenizer
    model_id: str
    limits: Limits
    chat_template: str
    api_key: str | None = None
    created: int = 0
    adapters: tuple[str, ...] = ()  # LoRA adapters over the base, chosen by a request's `model`
    pooling: str = "mean"  # /v1/embeddings' default pooling (camelid/embed.py)
    metrics: Metrics | None = None  # several models share the server's
    keys: KeyStore | None = None  # --keys: the key file, its scopes and limits (camelid/serve/keys.py)

    def __post_init__(self) -> None:
        self.metrics = self.metrics or Metrics(self.engine)
        self.created = self.created or int(time.time())


def record(request: Request, **fields) -> dict:
    """What this request did, for the stages that judge or log it after the answer (keys' token budgets, the audit
    log): `model`, `prompt` (the text the model read, or a function giving it: decoded only when a stage wants it),
    `answer` (what it wrote, choices joined by NUL), `usage`, `finish_reason`, `verdicts`. It lives in the ASGI
    scope, so pure-ASGI middleware reads it when the response ends; a middleware that wants it across scope copies
    creates `scope["camelid.record"] = {}` first."""
    rec = request.scope.setdefault("camelid.record", {})
    rec.update(fields)
    return rec


def key_salt(request: Request, params: GenParams) -> GenParams:
    """A key's requests reuse only the prompt-cache blocks made under the same key (then the same `cache_salt`), so
    one tenant's prompts never speed up, or time, another's. The single --api-key (`default`) is one tenant."""
    key = request.scope.get("camelid.key")
    if key is None or key.name == "default":
        return params
    return replace(params, cache_salt=f"key:{key.name}\0{params.cache_salt or ''}")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object; 413 past the size limit, 400 when it is not a JSON object."""
    if isinstance(getattr(request.state, "body", None), dict):  # read already, to choose the model
        return request.state.body
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes", None, "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes", None, "request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return data


def check_model(body: dict, state: ServerState) -> str | None:
    """The adapter a request's `model` names (None: the base model, also when `model` is absent); 404 if unknown."""
    model = body.get("model")
    if model is None or model == state.model_id:
        return None
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    if model in state.adapters:
        return model
    have = ", ".join(repr(m) for m in (state.model_id, *state.adapters))
    raise ApiError(404, f"the model {model!r} does not exist; this server has {have}", "model", "model_not_found")


# --- one choice's text as events arrive ---

class Choice:
    def __init__(self, index: int, seq, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.index, self.seq, self.tokenizer = index, seq, tokenizer
        self.text = TextStream(tokenizer, stop)
        self.finish_reason: str | None = None
        self.tokens = 0

    def handle(self, event: Token | Finish) -> tuple[str, Token | None]:
        """(new text, the token event if any). Sets finish_reason when this choice is over."""
        if self.finish_reason is not None:
            return "", None
        if isinstance(event, Finish):
            if event.reason == "error":
                raise ApiError(500, f"generation failed: {event.message}", None, "internal_error", type="server_error")
            self.finish_reason = "stop" if event.reason == "cancelled" else event.reason
            return self.text.finish(), None
        self.tokens += 1
        if event.id in self.seq.stop_ids:
            return "", event
        piece = self.text.add(event.id)
        if self.text.stopped:
            self.finish_reason = "stop"
        return piece, event


def chat_logprobs(tokenizer: Tokenizer, events: list[Token]) -> dict:
    def entry(tok: int, lp: float) -> dict:
        return {"token": tokenizer.token_text(tok), "logprob": lp, "bytes": list(tokenizer.decode_bytes([tok], special=True))}

    return {"content": [{**entry(e.id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top or []]}
                        for e in events if e.logprob is not None]}


def completion_logprobs(tokenizer: Tokenizer, events: list[Token], offset: int) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        if e.logprob is None:
            continue
        text = tokenizer.token_text(e.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({tokenizer.token_text(t): lp for t, lp in e.top or []})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def echo_logprobs(tokenizer: Tokenizer, prompt: list[int], scored: list[Token], generated: dict, prompt_chars: int) -> dict:
    """`echo` with `logprobs`: the prompt's tokens first (the first has no log-prob: nothing predicts it), then the
    generated ones, as OpenAI's legacy completions (and lm-eval's local-completions) read them."""
    out = completion_logprobs(tokenizer, scored, len(tokenizer.token_text(prompt[0])))
    first = tokenizer.token_text(prompt[0])
    return {"tokens": [first, *out["tokens"], *generated["tokens"]],
            "token_logprobs": [None, *out["token_logprobs"], *generated["token_logprobs"]],
            "top_logprobs": [None, *out["top_logprobs"], *generated["top_logprobs"]],
            "text_offset": [0, *out["text_offset"], *(prompt_chars + o for o in generated["text_offset"])]}


class Generation:
    """The n sequences of one request, submitted to the engine, read back as (choice, text, token) events."""

    def __init__(self, state: ServerState, prompt: list[int], params: GenParams, max_tokens: int,
                 adapter: str | None = None, tools: ToolRequest | None = None) -> None:
        self.state, self.prompt, self.params, self.adapter, self.tools = state, prompt, params, adapter, tools
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.choices: list[Choice] = []
        engine = state.engine
        for i in range(params.n):
            sampling = params.sampling
            if sampling.seed is not None and i:
                sampling = replace(sampling, seed=sampling.seed + i)
            seq = make_sequence(prompt, max_tokens, self._emitter(i), sampling=sampling, stop_ids=state.tokenizer.stop_ids,
                                logprobs=params.logprobs, adapter=adapter, echo=params.echo, salt=params.cache_salt,
                                speculate=params.speculate,
                                constraint=JsonConstraint(params.schema) if params.schema is not None
                                else tool_stage.constraint_for(tools))
            try:
                engine.submit(seq)
            except QueueFullError as e:
                self.cancel()
                raise ApiError(429, f"the server is busy ({e}); try again shortly", None, "rate_limit_exceeded",
                               type="rate_limit_error", headers={"Retry-After": "1"}) from None
            except EngineStoppedError as e:
                self.cancel()
                raise ApiError(503, f"the server cannot generate now: {e}", None, "unavailable", type="server_error",
                               headers={"Retry-After": "5"}) from None
            self.choices.append(Choice(i, seq, state.tokenizer, params.stop))

    def _emitter(self, i: int):
        def emit(event) -> None:  # engine thread -> event loop
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
            except RuntimeError:  # the loop is closed: the server is going down
                pass
        return emit

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                self.state.engine.cancel(c.seq)

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def events(self, request: Request):
        """Yield (choice, text, token event) until every choice is finished; stop early when the client is gone."""
        checked = time.perf_counter()
        # one get() lives across the quarter-second waits: asyncio.wait_for(queue.get(), timeout) can drop an event
        # that arrives just as its timeout fires (Python < 3.12), a token lost under load
        getter: asyncio.Future | None = None
        try:
            while not self.done:
                getter = getter or asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=0.25)
                i, event = getter.result() if done else (-1, None)
                if done:
                    getter = None
                if time.perf_counter() - checked >= 0.25:  # a gone client frees its slots within a quarter second
                    checked = time.perf_counter()
                    if await request.is_disconnected():
                        self.cancel()
                        break
                if event is None:
                    continue
                choice = self.choices[i]
                if isinstance(event, Token) and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.state.metrics.ttft.observe(self.first_token_at - self.start)
                text, token = choice.handle(event)
                if choice.finish_reason is not None and not isinstance(event, Finish):
                    self.state.engine.cancel(choice.seq)  # a stop string: free the slot now
                yield choice, text, token
        finally:
            if getter is not None:
                getter.cancel()
        if not self.done:  # the client left
            return
        m = self.state.metrics
        m.latency.observe(time.perf_counter() - self.start)
        m.prompt_tokens.inc(len(self.prompt) * len(self.choices))
        m.completion_tokens.inc(sum(c.tokens for c in self.choices))

    def usage(self) -> dict:
        done = sum(c.tokens for c in self.choices)
        cached = max(0, self.choices[0].seq.cached) if self.choices else 0
        return {"prompt_tokens": len(self.prompt), "completion_tokens": done, "total_tokens": len(self.prompt) + done,
                "prompt_tokens_details": {"cached_tokens": cached}}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def respond(request: Request, state: ServerState, gen: Generation, chat: bool,
                  context: list[dict] | None = None) -> Response:
    """The response of a generation: a stream or one JSON body. The content policy (if any) filters the answer on
    its way out (camelid/serve/policy.py); context is the conversation it answers, for the guard."""
    policy = getattr(request.app.state, "policy", None)
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": gen.adapter or state.model_id}
    tok = state.tokenizer
    markers = tool_stage.marker_ids(tok, gen.tools)
    outputs = [ChatOutput(gen.tools, markers) for _ in gen.choices]  # each choice's message (content, tool calls)
    record(request, model=head["model"], prompt=lambda: tok.decode(gen.prompt, special=True))  # the audit log decodes it
    if gen.params.stream:
        sent: list[list[str]] = [[] for _ in gen.choices]

        async def stream():
            try:
                if chat:
                    for c in gen.choices:
                        yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}]})
                offsets = [0] * len(gen.choices)
                async for choice, text, token in policy_stage.filtered(request, policy, gen, context or []):
                    sent[choice.index].append(text)
                    lp = None
                    if gen.params.logprobs is not None and token is not None and token.logprob is not None:
                        lp = chat_logprobs(tok, [token]) if chat else completion_logprobs(tok, [token], offsets[choice.index])
                    if chat:
                        out = outputs[choice.index]
                        if out.closed:
                            continue
                        delta = out.add(text, token.id if token is not None else None)
                        held = out.finish() if choice.finish_reason else {}
                        if delta and held:  # the last piece, then what was held back, with the finish reason
                            yield sse({**head, "choices": [{"index": choice.index, "delta": delta, "logprobs": lp,
                                                            "finish_reason": None}]})
                            lp = None
                        delta = held or delta
                        if delta or lp or choice.finish_reason:
                            reason = out.finish_reason(choice.finish_reason) if choice.finish_reason else None
                            yield sse({**head, "choices": [{"index": choice.index, "delta": delta, "logprobs": lp,
                                                            "finish_reason": reason}]})
                    elif text or lp or choice.finish_reason:
                        body = {"index": choice.index, "logprobs": lp, "finish_reason": choice.finish_reason, "text": text}
                        yield sse({**head, "choices": [body]})
                    offsets[choice.index] += len(text)
                if gen.params.include_usage:
                    yield sse({**head, "choices": [], "usage": gen.usage()})
                yield sse("[DONE]")
            except ApiError as e:
                yield sse(e.body())
                yield sse("[DONE]")
            finally:  # the client went away (or we are done): free every slot of this request
                gen.cancel()
                record(request, answer="\0".join("".join(t) for t in sent), usage=gen.usage(),
                       finish_reason=[c.finish_reason for c in gen.choices])

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts = [[] for _ in gen.choices]
    tokens: list[list[Token]] = [[] for _ in gen.choices]
    try:
        async for choice, text, token in policy_stage.filtered(request, policy, gen, context or []):
            texts[choice.index].append(text)
            if chat:
                outputs[choice.index].add(text, token.id if token is not None else None)
            if token is not None:
                tokens[choice.index].append(token)
    finally:
        gen.cancel()
        record(request, answer="\0".join("".join(t) for t in texts), usage=gen.usage(),
               finish_reason=[c.finish_reason for c in gen.choices])
    if not gen.done:  # the client left
        return Response(status_code=499)
    choices = []
    for c in gen.choices:
        text = "".join(texts[c.index])
        lp = None
        if gen.params.logprobs is not None:
            lp = chat_logprobs(tok, tokens[c.index]) if chat else completion_logprobs(tok, tokens[c.index], 0)
        if chat:
            out = outputs[c.index]
            if not out.closed:
                out.finish()
            choices.append({"index": c.index, "message": out.message(), "logprobs": lp,
                            "finish_reason": out.finish_reason(c.finish_reason)})
        elif gen.params.echo:
            echoed = tok.decode(gen.prompt, special=True)
            lp = echo_logprobs(tok, gen.prompt, c.seq.prompt_logprobs, lp, len(echoed)) if lp is not None else None
            choices.append({"index": c.index, "text": echoed + text, "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    head["object"] = "chat.completion" if chat else "text_completion"
    return JSONResponse({**head, "choices": choices, "usage": gen.usage()})


def constrained_fits(state: ServerState, params: GenParams, max_tokens: int) -> None:
    if params.schema is not None and len(state.engine.tokens_for(JsonConstraint(params.schema).completion())) > max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is too small for the smallest value the response_format allows",
                       "max_tokens", "invalid_value")


# --- endpoints ---

async def chat_completions(request: Request) -> Response:
    state: ServerState = state_of(request)
    body = await read_json(request, state.limits)
    adapter = check_model(body, state)
    params = key_salt(request, parse_common(body, state.limits, chat=True))
    tools = tool_stage.parse_request(body, state.chat_template)
    checked = await policy_stage.check_messages(request, request.app.state.policy, messages_of(body))  # may block
    messages, extra = tool_stage.prepare(checked, state.chat_template, tools)
    try:
        prompt = chat_mod.encode_chat(state.tokenizer, messages, state.chat_template, **extra)
    except chat_mod.TemplateError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    max_tokens = check_fits(len(prompt), params.max_tokens, state.limits, "messages")
    constrained_fits(state, params, max_tokens)
    tool_stage.check_fits(tools, params, max_tokens, state.engine.tokens_for)
    return await respond(request, state, Generation(state, prompt, params, max_tokens, adapter, tools), chat=True,
                         context=policy_stage.conversation(checked))


async def completions(request: Request) -> Response:
    state: ServerState = state_of(request)
    body = await read_json(request, state.limits)
    adapter = check_model(body, state)
    params = key_salt(request, parse_common(body, state.limits, chat=False))
    if params.echo and params.stream:
        raise ApiError(400, "'echo' is supported without 'stream' only", "echo", "invalid_value")
    prompt = await policy_stage.check_prompt(request, request.app.state.policy, prompt_of(body))  # may block
    if isinstance(prompt, str):
        ids = state.tokenizer.encode(prompt, special=True, bos=True)
    else:
        if any(not 0 <= t < state.tokenizer.vocab_size for t in prompt):
            raise ApiError(400, f"token ids must be in [0, {state.tokenizer.vocab_size})", "prompt", "invalid_value")
        ids = prompt
    max_tokens = check_fits(len(ids), params.max_tokens, state.limits, "prompt")
    constrained_fits(state, params, max_tokens)
    context = [{"role": "user", "content": prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt)}]
    return await respond(request, state, Generation(state, ids, params, max_tokens, adapter), chat=False,
                         context=context)


def model_objects(state: ServerState, registry=None) -> list[dict]:
    """The model objects this server answers for: the base model, then its adapters; with several models, each
    with its status (loaded, loading, unloaded) and load count."""
    if registry is not None:
        return [{"object": "model", "created": state.created, "owned_by": "camelid", **m} for m in registry.listing()]
    base = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "camelid",
            "max_model_len": state.limits.max_seq_len, "pooling": state.pooling,
            "embedding_dimensions": state.engine.model.config.dim}
    adapters = [{**base, "id": name, "parent": state.model_id} for name in state.adapters]  # as vLLM lists LoRAs
    return [base, *adapters]


def visible_models(request: Request) -> list[dict]:
    """The model objects the request's key may use (a key's `models` scope hides the others)."""
    key = request.scope.get("camelid.key")
    objects = model_objects(request.app.state.camelid, request.app.state.registry)
    return [m for m in objects if key is None or key.allows_model(m["id"])]


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": visible_models(request)})


async def model_info(request: Request) -> Response:
    """GET /v1/models/{id}: one model object, or a 404 with an OpenAI-style body."""
    wanted = request.path_params["model_id"]
    for m in visible_models(request):
        if m["id"] == wanted:
            return JSONResponse(m)
    raise ApiError(404, f"the model {wanted!r} does not exist", "model", "model_not_found")


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.camelid
    if not state.engine.running and getattr(request.app.state, "registry", None) is None:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.camelid
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def tokenize(request: Request) -> Response:
    state: ServerState = state_of(request)
    body = await read_json(request, state.limits)
    tok = state.tokenizer
    if "messages" in body:
        try:
            ids = chat_mod.encode_chat(tok, messages_of(body), state.chat_template)
        except chat_mod.TemplateError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
    else:
        text = body.get("content", body.get("prompt"))
        if not isinstance(text, str):
            raise ApiError(400, "'content' must be a string (or give 'messages')", "content", "invalid_type")
        add_special = body.get("add_special", True)
        if not isinstance(add_special, bool):
            raise ApiError(400, "'add_special' must be a boolean", "add_special", "invalid_type")
        ids = tok.encode(text, special=True, bos=add_special)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.limits.max_seq_len})


async def detokenize(request: Request) -> Response:
    state: ServerState = state_of(request)
    body = await read_json(request, state.limits)
    ids = body.get("tokens")
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise ApiError(400, "'tokens' must be a list of token ids", "tokens", "invalid_type")
    if any(not 0 <= t < state.tokenizer.vocab_size for t in ids):
        raise ApiError(400, f"token ids must be in [0, {state.tokenizer.vocab_size})", "tokens", "invalid_value")
    return JSONResponse({"content": state.tokenizer.decode(ids, special=True)})


async def index(request: Request) -> Response:
    page = resources.files("camelid.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                                   "style-src 'unsafe-inline'"})


# --- several models: a request leases the one it names ---

def state_of(request: Request) -> ServerState:
    """The model state a request runs on: the one its lease chose, else the server's only model."""
    return getattr(request.state, "camelid", None) or request.app.state.camelid


def leased(handler):
    """Wrap an endpoint: with a registry, lease the body's `model` (loading it on demand, waiting while it loads) for
    the whole response, streams included, and release it with the body's `keep_alive` when the response ends."""
    from starlette.background import BackgroundTask

    from .registry import parse_keep_alive

    async def endpoint(request: Request) -> Response:
        registry = getattr(request.app.state, "registry", None)
        if registry is None:
            return await handler(request)
        body = await read_json(request, request.app.state.camelid.limits)
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        entry = await registry.acquire(body.get("model"))
        request.state.body, request.state.camelid = body, entry.state
        try:
            response = await handler(request)
        except BaseException:
            await registry.release(entry, keep_alive)
            raise
        response.background = BackgroundTask(registry.release, entry, keep_alive)
        return response

    return endpoint


# --- errors as OpenAI-style bodies, never a traceback ---

async def api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


async def http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(ApiError(exc.status_code, str(exc.detail), None, code))


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}", None, "internal_error", type="server_error"))


class CountRequests:
    """Counts every answered request by endpoint and status, for /metrics."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.endpoints else "other"

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(endpoint=path, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counted)


def retrieval_routes() -> list[Route]:
    from .embeddings import embeddings
    from .rerank import rerank_endpoint as rerank

    return [Route("/v1/embeddings", leased(embeddings), methods=["POST"]),
            *(Route(p, leased(rerank), methods=["POST"]) for p in ("/v1/rerank", "/v2/rerank", "/rerank"))]


def create_app(state: ServerState, cors_origins: list[str] | None = None, registry=None, audit=None,
               policy=None) -> Starlette:
    """The ASGI app. The engine is started and stopped with the app's lifespan.

    registry (camelid/serve/registry.py): several models, `state` being the first (loaded) one.
    audit: a camelid.audit.AuditLog, written one record per request (camelid/serve/audit.py).
    policy (camelid/serve/policy.py): content rules and a guard model on every generation path."""
    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", model_info),
        Route("/v1/chat/completions", leased(chat_completions), methods=["POST"]),
        Route("/v1/completions", leased(completions), methods=["POST"]),
        Route("/tokenize", leased(tokenize), methods=["POST"]),
        Route("/detokenize", leased(detokenize), methods=["POST"]),
        *retrieval_routes(),
        Route("/v1/moderations", policy_stage.moderations, methods=["POST"]),  # the content policy's guard and rules
    ]
    middleware = []
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(CountRequests, metrics=state.metrics, endpoints={r.path for r in routes}))
    if audit is not None:  # the audit log: one record per request, outside auth so refusals are logged too
        from .audit import AuditMiddleware, add_metrics

        add_metrics(state.metrics, audit)
        middleware.append(Middleware(AuditMiddleware, log=audit))
    # authenticate + limits (camelid/serve/gate.py): --api-key and --keys; sets scope["camelid.key"]
    limiter = Limiter(state.keys.clock, state.keys.ledger) if state.keys is not None else None
    middleware.append(Middleware(KeysMiddleware, api_key=state.api_key, store=state.keys, metrics=state.metrics,
                                 default_model=state.model_id, max_body_bytes=state.limits.max_body_bytes, limiter=limiter))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if not state.engine.running:
            state.engine.start()
        reaper = asyncio.create_task(_reap(registry)) if registry is not None else None
        yield
        if reaper is not None:
            reaper.cancel()
            registry.stop_all()
        state.engine.stop()
        if limiter is not None:
            limiter.save()  # the day's token counts of each key

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        Exception: server_error})
    app.state.camelid = state
    app.state.registry = registry
    app.state.policy = policy
    return app


async def _reap(registry) -> None:
    """Unload models whose keep-alive has run out, twice a second."""
    while True:
        await asyncio.sleep(0.5)
        await registry.reap()
