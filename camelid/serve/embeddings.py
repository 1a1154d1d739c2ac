"""POST /v1/embeddings (OpenAI's shape): parse and check the request, run the forwards as engine jobs, answer.

Stages: parse (inputs -> token lists, every mistake a 400) -> engine (camelid.embed over the serving weights, one
job of at most embed.BATCH_TOKENS padded tokens at a time, between the decode steps of running streams) ->
response (`float` lists or `base64` little-endian float32, as the openai client asks by default).

Beyond OpenAI's fields: `pooling` (mean | last | cls; default the server's --pooling, listed in /v1/models),
`normalize` (default true) and `truncate` (default false: an input longer than the context is a 400).
"""

from __future__ import annotations

import asyncio
import base64
import struct
from dataclasses import dataclass

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import embed
from .engine import EngineStoppedError, QueueFullError
from .params import ApiError

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


@dataclass
class EmbedRequest:
    inputs: list[list[int]]
    pooling: str
    normalize: bool
    dimensions: int | None
    encoding_format: str


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _option(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {int: "an integer", str: "a string", bool: "a boolean"}[kind]
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__}", name, "invalid_type")
    return value


def token_lists(body: dict, tokenizer, max_len: int, field: str = "input") -> list[list[int]]:
    """`input` as token lists: a string, a list of strings, a token-id list or a list of them. 400 when empty, of a
    wrong type, out of the vocabulary, or longer than max_len tokens without `truncate: true`."""
    value = body.get(field)
    if value is None:
        raise ApiError(400, f"'{field}' is required: a string, a list of strings, or token ids", field, "missing_required")
    truncate = _option(body, "truncate", bool, False)
    if isinstance(value, str) or _is_ids(value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise ApiError(400, f"'{field}' must be a string, a list of strings, or token ids, got {type(value).__name__}",
                       field, "invalid_type")
    if not items:
        raise ApiError(400, f"'{field}' is an empty list: give at least one input", field, "invalid_value")
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"'{field}' has {len(items)} inputs; at most {MAX_INPUTS} per request", field, "invalid_value")
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if len(items) > 1 or not (isinstance(value, str) or _is_ids(value)) else field
        if isinstance(item, str):
            ids = tokenizer.encode(item, special=False, bos=True)
        elif _is_ids(item):
            ids = item
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise ApiError(400, f"'{where}': token ids must be in [0, {tokenizer.vocab_size})", field, "invalid_value")
        else:
            raise ApiError(400, f"'{where}' must be a string or a list of token ids, got {type(item).__name__}"
                           + (" (an empty list)" if item == [] else ""), field, "invalid_type")
        if not ids:
            raise ApiError(400, f"'{where}' is empty: it has no tokens to embed", field, "invalid_value")
        if len(ids) > max_len:
            if not truncate:
                raise ApiError(400, f"'{where}' is {len(ids)} tokens, longer than the context of {max_len}; shorten it "
                               "or send \"truncate\": true to embed its first tokens", field, "context_length_exceeded")
            ids = ids[:max_len]
        out.append(list(ids))
    return out


def parse(body: dict, state) -> EmbedRequest:
    inputs = token_lists(body, state.tokenizer, state.limits.max_seq_len)
    pooling = _option(body, "pooling", str, state.pooling)
    if pooling not in embed.POOLINGS:
        raise ApiError(400, f"unknown pooling {pooling!r}; choose one of {', '.join(embed.POOLINGS)}", "pooling",
                       "invalid_value")
    normalize = _option(body, "normalize", bool, True)
    fmt = _option(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format",
                       "invalid_value")
    dims = _option(body, "dimensions", int, None)
    full = state.engine.model.config.dim
    if dims is not None and not 1 <= dims <= full:
        raise ApiError(400, f"'dimensions' must be between 1 and {full} (this model's embeddings have {full}; shorter "
                       f"ones are their first components, renormalised), got {dims}", "dimensions", "invalid_value")
    return EmbedRequest(inputs, pooling, normalize, dims, fmt)


async def run_jobs(request: Request, state, jobs, adapter: str | None) -> list | None:
    """Each job's result, run one after another on the engine thread (None if the client left meanwhile)."""
    results = []
    for job in jobs:
        try:
            future = state.engine.call(job, adapter)
        except QueueFullError as e:
            raise ApiError(429, f"the server is busy ({e}); try again shortly", None, "rate_limit_exceeded",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except EngineStoppedError as e:
            raise ApiError(503, f"the server cannot run the model now: {e}", None, "unavailable", type="server_error",
                           headers={"Retry-After": "5"}) from None
        try:
            results.append(await asyncio.wrap_future(future))
        except EngineStoppedError as e:
            raise ApiError(503, f"the server cannot run the model now: {e}", None, "unavailable", type="server_error",
                           headers={"Retry-After": "5"}) from None
        if len(jobs) > 1 and await request.is_disconnected():
            return None
    return results


async def vectors(request: Request, state, inputs: list[list[int]], pooling: str, normalize: bool,
                  adapter: str | None) -> torch.Tensor | None:
    """[N,D] vectors of the token lists from the serving model (None if the client left)."""
    model = state.engine.model
    groups = embed.batches([len(x) for x in inputs])
    jobs = [lambda g=g: embed.embed_batch(model, [inputs[i] for i in g], pooling, normalize) for g in groups]
    results = await run_jobs(request, state, jobs, adapter)
    if results is None:
        return None
    out = torch.empty(len(inputs), model.config.dim)
    for g, v in zip(groups, results, strict=True):
        out[g] = v
    return out


def encode(v: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, what the openai client decodes (numpy.frombuffer(..., "float32"))
        return base64.b64encode(struct.pack(f"<{v.numel()}f", *v.tolist())).decode("ascii")
    return v.tolist()


async def embeddings(request: Request) -> Response:
    from .app import check_model, read_json, state_of

    state = state_of(request)  # the model the body names, with several models (app.leased)
    body = await read_json(request, state.limits)
    adapter = check_model(body, state)
    req = parse(body, state)
    out = await vectors(request, state, req.inputs, req.pooling, req.normalize, adapter)
    if out is None:
        return Response(status_code=499)
    if req.dimensions is not None:
        out = embed.shorten(out, req.dimensions, req.normalize)
    tokens = sum(len(x) for x in req.inputs)
    data = [{"object": "embedding", "index": i, "embedding": encode(v, req.encoding_format)} for i, v in enumerate(out)]
    return JSONResponse({"object": "list", "data": data, "model": adapter or state.model_id,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
