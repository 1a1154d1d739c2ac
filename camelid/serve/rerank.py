"""POST /v1/rerank (also /v2/rerank and /rerank), in the shape Jina and Cohere clients use.

    {"query": "...", "documents": ["...", {"text": "..."}], "top_n": 3, "return_documents": true}
 -> {"results": [{"index": 1, "relevance_score": 0.93, "document": {"text": "..."}}, ...], "method": "embedding", ...}

Stages: parse (every mistake a 400) -> engine (the pairs scored by camelid.rerank over the serving weights, in
batched engine jobs between decode steps) -> response (sorted by score, best first; the method stated).
Beyond the clients' fields: `method` ("likelihood", the default: the query's likelihood as a question about the
document; "llm": the model's P(yes) to "does the document answer the query?"; "embedding": cosine of mean-pooled
embeddings; see camelid/rerank.py) and `truncate` (cut documents to fit the context).
"""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import embed, rerank
from .embeddings import MAX_INPUTS, run_jobs, token_lists, vectors
from .params import ApiError


def _documents(body: dict) -> list[str]:
    docs = body.get("documents")
    if not isinstance(docs, list):
        raise ApiError(400, "'documents' must be a list of strings (or of objects with a 'text')", "documents",
                       "missing_required" if docs is None else "invalid_type")
    if not docs:
        raise ApiError(400, "'documents' is an empty list: give at least one document", "documents", "invalid_value")
    if len(docs) > MAX_INPUTS:
        raise ApiError(400, f"'documents' has {len(docs)} entries; at most {MAX_INPUTS} per request", "documents",
                       "invalid_value")
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and isinstance(d.get("text"), str):
            d = d["text"]
        if not isinstance(d, str):
            raise ApiError(400, f"'documents[{i}]' must be a string or an object with a string 'text', got "
                           f"{type(d).__name__}", "documents", "invalid_type")
        out.append(d)
    return out


def _fit(state, method: str, query: str, doc: str, i: int, truncate: bool) -> tuple[list[int], int]:
    """(prompt ids, scored tokens' start) of one pair, its document cut to fit the context when truncate is set
    (else a 400)."""
    tok, limit = state.tokenizer, state.limits.max_seq_len
    ids, start = rerank.pair_rows(method, tok, state.chat_template, query, doc)
    while len(ids) > limit:
        if not truncate:
            raise ApiError(400, f"the query with 'documents[{i}]' is {len(ids)} tokens, longer than the context of "
                           f"{limit}; shorten it or send \"truncate\": true", "documents", "context_length_exceeded")
        doc_ids = tok.encode(doc, special=False, bos=False)
        keep = len(doc_ids) - (len(ids) - limit) - 1
        if keep <= 0:
            raise ApiError(400, f"the query alone does not leave room for a document in the context of {limit}",
                           "query", "context_length_exceeded")
        doc = tok.decode(doc_ids[:keep])
        ids, start = rerank.pair_rows(method, tok, state.chat_template, query, doc)
    return ids, start


async def rerank_scores(request: Request, state, query: str, docs: list[str], method: str, truncate: bool,
                        adapter: str | None) -> tuple[list[float], int] | None:
    """(a score per document, tokens read), or None if the client left."""
    if method == "embedding":
        limit = state.limits.max_seq_len
        inputs = (token_lists({"query": query, "truncate": truncate}, state.tokenizer, limit, "query")
                  + token_lists({"documents": docs, "truncate": truncate}, state.tokenizer, limit, "documents"))
        out = await vectors(request, state, inputs, "mean", True, adapter)
        if out is None:
            return None
        return rerank.cosine_scores(out[0], out[1:]).tolist(), sum(len(x) for x in inputs)
    fitted = [_fit(state, method, query, d, i, truncate) for i, d in enumerate(docs)]
    rows, starts = [r for r, _ in fitted], [s for _, s in fitted]
    model = state.engine.model
    groups = embed.batches([len(r) for r in rows])
    if method == "likelihood":
        jobs = [lambda g=g: rerank.likelihood_batch(model, [rows[i] for i in g], [starts[i] for i in g])
                for g in groups]
    else:
        try:
            yes, no = rerank.answer_ids(state.tokenizer)
        except ValueError as e:
            raise ApiError(400, str(e), "method", "invalid_value") from None
        jobs = [lambda g=g: rerank.judge_batch(model, [rows[i] for i in g], yes, no) for g in groups]
    results = await run_jobs(request, state, jobs, adapter)
    if results is None:
        return None
    scores = [0.0] * len(rows)
    for g, part in zip(groups, results, strict=True):
        for i, s in zip(g, part.tolist(), strict=True):
            scores[i] = s
    return scores, sum(len(r) for r in rows)


async def rerank_endpoint(request: Request) -> Response:
    from .app import check_model, read_json, state_of

    state = state_of(request)  # the model the body names, with several models (app.leased)
    body = await read_json(request, state.limits)
    adapter = check_model(body, state)
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise ApiError(400, "'query' must be a non-empty string", "query",
                       "missing_required" if query is None else "invalid_type")
    docs = _documents(body)
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ApiError(400, f"'top_n' must be a positive integer, got {top_n!r}", "top_n", "invalid_value")
    flags = {}
    for name, default in (("return_documents", True), ("truncate", False)):
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be a boolean, got {type(value).__name__}", name, "invalid_type")
        flags[name] = value
    method = body.get("method", rerank.DEFAULT_METHOD)
    if method not in rerank.METHODS:
        raise ApiError(400, f"unknown rerank method {method!r}; choose one of {', '.join(rerank.METHODS)}", "method",
                       "invalid_value")
    got = await rerank_scores(request, state, query, docs, method, flags["truncate"], adapter)
    if got is None:
        return Response(status_code=499)
    scores, tokens = got
    results = []
    for i in rerank.ranked(scores, top_n):
        entry = {"index": i, "relevance_score": scores[i]}
        if flags["return_documents"]:
            entry["document"] = {"text": docs[i]}
        results.append(entry)
    return JSONResponse({"id": "rerank-" + secrets.token_hex(12), "object": "list", "model": adapter or state.model_id,
                         "method": method, "results": results,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
