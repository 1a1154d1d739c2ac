"""Tool calling and the rest of the OpenAI surface end to end: a real server driven by the `openai` client,
on the default model (camelid's JSON format) and on a tiny random model with Meta's Llama 3.1 template."""

from __future__ import annotations

import json

import pytest
from conftest import running_server
from test_tools import DATA, SPECIALS, TOOLS, valid

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
MODEL = "smollm2"
ASK = [
    "What is the weather in Paris?",
    "What time is it in Tokyo?",
    "Find me recipes for lentil soup.",
    "Is it raining in Lima right now?",
]


@pytest.fixture(scope="module")
def server(default_model_path):
    with running_server(default_model_path, "--model-id", MODEL, "--max-seq-len", "2048", "--log-level",
                        "warning") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def streamed(client, **kw):
    """(content, calls, finish_reason) put together from a stream the way an SDK does, checking its shape."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        reason = chunk.choices[0].finish_reason or reason
        content += d.content or ""
        for t in d.tool_calls or []:
            if t.index not in calls:
                assert t.id and t.function.name and t.index == len(calls), "id and name once, indices in order"
                calls[t.index] = [t.function.name, ""]
            else:
                assert t.id is None and t.function.name is None
            calls[t.index][1] += t.function.arguments or ""
    assert "<|" not in content and '"arguments"' not in content or not calls  # no markup of a call in content
    return content or None, [(n, json.loads(a)) for n, a in calls.values()], reason


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_calls_are_valid_every_time(client, stream):
    # sampled (temperature 1), a different prompt and seed for each: every call must still fit its schema
    named = [{"type": "function", "function": {"name": t["function"]["name"]}} for t in TOOLS]
    for i, (ask, choice) in enumerate(zip(ASK, ["required", *named], strict=True)):
        kw = dict(model=MODEL, messages=user(ask), tools=TOOLS, tool_choice=choice, temperature=1.0,
                  seed=i + 10 * stream, max_tokens=60, parallel_tool_calls=i != 0)
        if stream:
            _, calls, reason = streamed(client, **kw)
        else:
            r = client.chat.completions.create(**kw)
            calls, reason = calls_of(r.choices[0].message), r.choices[0].finish_reason
        # a sampled string argument can reach max_tokens: the grammar then closes the call in the tokens left, so the
        # call is still valid and the finish reason says "length" (as OpenAI's does at max_tokens)
        assert calls and reason in ("tool_calls", "length"), (ask, choice, reason)
        for name, args in calls:
            assert valid(name, args), (name, args)
        if isinstance(choice, dict):
            assert [n for n, _ in calls] == [choice["function"]["name"]]


def test_stream_equals_non_stream(client):
    for choice in ["required", "auto"]:
        kw = dict(model=MODEL, messages=user(ASK[0]), tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=40)
        m = client.chat.completions.create(**kw).choices[0]
        assert streamed(client, **kw) == (m.message.content, calls_of(m.message), m.finish_reason)


def test_none_gives_no_call_and_parallel_false_at_most_one(client):
    for i, ask in enumerate(ASK[:2]):
        r = client.chat.completions.create(model=MODEL, messages=user(ask), tools=TOOLS, tool_choice="none",
                                           temperature=1.0, seed=i, max_tokens=30)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"
        assert isinstance(r.choices[0].message.content, str)
        for choice in ["required", "auto"]:
            r = client.chat.completions.create(model=MODEL, messages=user(ask), tools=TOOLS, tool_choice=choice,
                                               parallel_tool_calls=False, temperature=1.0, seed=i, max_tokens=60)
            assert len(r.choices[0].message.tool_calls or []) <= 1


def test_tool_round_trip_continues_the_conversation(client):
    messages = user(ASK[0])
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))  # arguments go back as the JSON string
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})})
    for choice in ["none", "auto"]:
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=20)
        m = r.choices[0].message
        assert m.content or m.tool_calls
        alone = client.chat.completions.create(model=MODEL, messages=messages[:1], tools=TOOLS, tool_choice=choice,
                                               max_tokens=1)
        assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 10  # the call and its result are in the prompt


def test_logit_bias_is_applied(client, server):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=1)
    r = client.completions.create(**kw)
    top = r.choices[0].text
    ids = httpx.post(server + "/tokenize", json={"content": top, "add_special": False}).json()
    first = ids["tokens"][0]
    banned = client.completions.create(**kw, logit_bias={str(first): -100}).choices[0].text
    assert banned != top
    forced = client.completions.create(**kw, logit_bias={"42": 100}).choices[0]
    assert forced.logprobs.tokens == [httpx.post(server + "/detokenize", json={"tokens": [42]}).json()["content"]]
    c = client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=1, temperature=0,
                                       logit_bias={"42": 100})
    assert c.choices[0].message.content == forced.text


def test_model_by_id(client, server):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    assert m.model_dump() == [x for x in client.models.list().model_dump()["data"] if x["id"] == MODEL][0]
    r = httpx.get(server + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"1": 500}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required", "max_tokens": 3}, "max_tokens"),
    ("/v1/chat/completions", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("/v1/completions", {"suffix": "the end"}, "suffix"),
    ("/v1/completions", {"tools": TOOLS}, "tools"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
])
def test_fields_that_change_output_are_refused_by_name(server, path, extra, param):
    body = {"messages": user("Hi")} if "chat" in path else {"prompt": "Hi"}
    r = httpx.post(server + path, json={**body, "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(server + path, json={**body, "max_tokens": 2, "user": "u1", "metadata": {"a": "b"},
                                         "store": False}, timeout=60)
    assert ok.status_code == 200  # labels only: ignored


def test_python_api_returns_valid_calls(llm):
    from camelid.sampling import SamplingParams

    for seed, ask in enumerate(ASK[:1]):
        m = llm.chat(user(ask), tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                     sampling=SamplingParams(temperature=1.0, seed=seed), max_tokens=80)
        assert m["role"] == "assistant" and len(m["tool_calls"]) == 1
        f = m["tool_calls"][0]["function"]
        assert valid(f["name"], json.loads(f["arguments"]))
        messages = user(ask) + [m, {"role": "tool", "tool_call_id": m["tool_calls"][0]["id"], "content": "18 C"}]
        assert isinstance(llm.chat(messages, tools=TOOLS, tool_choice="none", max_tokens=10)["content"], str)


def test_llama31_template_model_calls_are_valid(tmp_path):
    """A tiny random model with Meta's Llama 3.1 template: its prompt gets the tools natively, and whatever the
    random weights write (special tokens included), required calls are valid and auto never fails."""
    from gguf_factory import Spec, byte_level_vocab, write_gguf

    path = tmp_path / "tiny-llama31.gguf"
    write_gguf(path, Spec(context_length=2048), byte_level_vocab(SPECIALS),
               chat_template=(DATA / "llama-3.1-8b-instruct.jinja").read_text())
    with running_server(path, "--model-id", "tiny", "--log-level", "warning") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        for seed, choice in enumerate(["required", "auto", {"type": "function", "function": {"name": "search"}}]):
            r = client.chat.completions.create(model="tiny", messages=user(ASK[seed]), tools=TOOLS, n=2,
                                               tool_choice=choice, temperature=1.5, seed=seed, max_tokens=120)
            for c in r.choices:
                calls = calls_of(c.message)
                assert calls or choice == "auto"
                assert all(valid(n, a) or n not in {t["function"]["name"] for t in TOOLS} for n, a in calls)
