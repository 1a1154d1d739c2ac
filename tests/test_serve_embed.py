"""/v1/embeddings and /v1/rerank end to end: a real server on the fast (quantized) path, the `openai` client and raw
HTTP. The vectors' agreement with llama.cpp is in tests/test_embed.py; here: the wire formats, batch invariance
on the served weights, errors, and that embedding work leaves a running chat stream's greedy text unchanged."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import running_server

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MODEL = "smollm2-135m-instruct"
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "hi",
         "A longer sentence about the weather in the mountains during winter, when the snow falls and the roads close."]


@pytest.fixture(scope="module")
def server(default_model_path):
    flags = ["--model-id", MODEL, "--max-concurrency", "2", "--max-seq-len", "256", "--log-level", "warning",
             "--pooling", "mean"]
    with running_server(default_model_path, *flags) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server + path, json=body, timeout=300)


def norm(v) -> float:
    return sum(x * x for x in v) ** 0.5


def test_openai_client_embeddings_alone_and_batched_are_identical(client, server):
    batch = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in batch.data] == list(range(len(TEXTS)))
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > len(TEXTS)
    floats = post(server, "/v1/embeddings", {"input": TEXTS, "encoding_format": "float"}).json()
    for i, text in enumerate(TEXTS):
        alone = client.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding
        assert len(alone) == 576 and abs(norm(alone) - 1) < 1e-5
        assert alone == floats["data"][i]["embedding"]  # exact: same float32 values, alone or among others
        assert [float(x) for x in batch.data[i].embedding] == alone  # base64 carries the same float32 values


def test_dimensions_token_ids_pooling_and_models_entry(client, server):
    full = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=64, encoding_format="float").data[0].embedding
    head = full[:64]
    assert len(short) == 64 and max(abs(a - b / norm(head)) for a, b in zip(short, head)) < 1e-6
    ids = httpx.post(server + "/tokenize", json={"content": TEXTS[0]}, timeout=60).json()["tokens"]
    by_ids = post(server, "/v1/embeddings", {"input": [ids], "encoding_format": "float"}).json()["data"][0]["embedding"]
    assert by_ids == full
    last = post(server, "/v1/embeddings", {"input": TEXTS[0], "pooling": "last"}).json()["data"][0]["embedding"]
    assert last != full and abs(norm(last) - 1) < 1e-5
    raw = post(server, "/v1/embeddings", {"input": TEXTS[0], "normalize": False}).json()["data"][0]["embedding"]
    assert abs(norm(raw) - 1) > 1e-3 and max(abs(a - b / norm(raw)) for a, b in zip(full, raw)) < 1e-5
    entry = httpx.get(server + "/v1/models", timeout=60).json()["data"][0]
    assert entry["pooling"] == "mean" and entry["embedding_dimensions"] == 576


@pytest.mark.parametrize("body, param, words", [
    ({"input": "x", "pooling": "max"}, "pooling", "unknown pooling"),
    ({"input": []}, "input", "empty list"),
    ({"input": 42}, "input", "must be a string"),
    ({"input": ["ok", {"text": "x"}]}, "input", "input[1]"),
    ({"input": [[]]}, "input", "empty"),
    ({"input": ""}, "input", "no tokens"),
    ({"input": "word " * 300}, "input", "longer than the context of 256"),
    ({"input": [[1, 2, 10 ** 9]]}, "input", "token ids must be in"),
    ({"input": "x", "dimensions": 577}, "dimensions", "between 1 and 576"),
    ({"input": "x", "dimensions": "8"}, "dimensions", "an integer"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "model": "other"}, "model", "does not exist"),
])
def test_bad_embedding_requests_are_openai_errors(server, body, param, words):
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and words in err["message"]


def test_too_long_input_is_embedded_when_truncation_is_asked(server):
    r = post(server, "/v1/embeddings", {"input": "word " * 300, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256


def test_openai_client_sees_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="empty list"):
        client.embeddings.create(model=MODEL, input=[])


@pytest.mark.slow
def test_embedding_during_a_chat_stream_leaves_its_greedy_text_unchanged(client, server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
            "temperature": 0, "max_tokens": 40}
    alone = client.chat.completions.create(**body).choices[0].message.content
    results: list[int] = []

    def embed_some() -> None:
        for _ in range(3):
            results.append(post(server, "/v1/embeddings", {"input": TEXTS * 4}).status_code)

    pieces, worker = [], None
    with httpx.stream("POST", server + "/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                pieces.append(delta)
                if worker is None:  # the stream is running: now embed beside it
                    worker = threading.Thread(target=embed_some)
                    worker.start()
    worker.join(300)
    assert results == [200, 200, 200]
    assert "".join(pieces) == alone


# --- rerank ---

DOCS = ["Bananas are rich in potassium and grow in tropical climates.",
        "Paris is the capital and largest city of France.",
        {"text": "The stock market fell sharply on Tuesday."}]
QUERY = "What is the capital of France?"


@pytest.mark.parametrize("method", ["likelihood", "embedding", "llm"])
def test_rerank_sorted_top_n_and_documents(server, method):
    full = post(server, "/v1/rerank", {"model": MODEL, "query": QUERY, "documents": DOCS, "method": method}).json()
    if method == "likelihood":
        assert post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()["method"] == method  # default
    assert full["method"] == method and full["model"] == MODEL and full["usage"]["total_tokens"] > 0
    results = full["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    texts = [d if isinstance(d, str) else d["text"] for d in DOCS]
    assert all(r["document"] == {"text": texts[r["index"]]} for r in results)  # returned by default (as Jina)
    assert results[0]["index"] == 1
    top = post(server, "/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False,
                                      "method": method}).json()["results"]
    assert top == [{"index": r["index"], "relevance_score": r["relevance_score"]} for r in results[:2]]
    # a document's score does not depend on the others beside it
    one = post(server, "/rerank", {"query": QUERY, "documents": [DOCS[1]], "method": method}).json()["results"][0]
    assert one["relevance_score"] == next(r["relevance_score"] for r in results if r["index"] == 1)


@pytest.mark.parametrize("body, param", [
    ({"documents": ["a"]}, "query"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": "a"}, "documents"),
    ({"query": "q", "documents": ["a", 3]}, "documents"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
    ({"query": "q", "documents": ["a"], "method": "bm25"}, "method"),
    ({"query": "q", "documents": ["word " * 300]}, "documents"),
    ({"query": "q", "documents": ["word " * 300], "method": "llm"}, "documents"),
    ({"query": "q", "documents": ["word " * 300], "method": "likelihood"}, "documents"),
])
def test_bad_rerank_requests_are_openai_errors(server, body, param):
    r = post(server, "/v1/rerank", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.slow
def test_rerank_truncates_long_documents_when_asked(server):
    for method in ("likelihood", "embedding", "llm"):
        r = post(server, "/v1/rerank", {"query": "q", "documents": ["word " * 300, "short"], "truncate": True,
                                        "method": method})
        assert r.status_code == 200, r.text
