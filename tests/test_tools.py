"""Tool calling without a model: the formats' corpus, streaming at every split, the lazy grammar, and the
Llama 3.1 round trip rendered as transformers renders it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from camelid import toolformats as tf
from camelid.serve import tools as tool_stage
from camelid.serve.params import ApiError

DATA = Path(__file__).parent / "data"
NAMES = ("get_weather", "get_time", "search")
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time now in a time zone", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"]}}},
]
W = {"city": "Paris"}

# (format, model output, expected content, expected calls as (name, arguments))
CORPUS = [
    # camelid's own JSON format (templates without tool syntax, like the default model's)
    (tf.JSON, '{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", W)]),
    (tf.JSON, '{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}', None,
     [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (tf.JSON, 'Let me look that up.\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "Let me look that up.",
     [("get_weather", W)]),
    (tf.JSON, '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "get_time", "arguments": {"tz": "CET"}}',
     None, [("get_weather", W), ("get_time", {"tz": "CET"})]),
    (tf.JSON, '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", W)]),
    (tf.JSON, '{\n  "name": "search",\n  "arguments": {\n    "query": "llamas {and} alpacas",\n    "limit": 3\n  }\n}',
     None, [("search", {"query": "llamas {and} alpacas", "limit": 3})]),
    (tf.JSON, '[{"name": "get_time", "arguments": {"tz": "UTC"}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]',
     None, [("get_time", {"tz": "UTC"}), ("get_weather", W)]),
    (tf.JSON, 'Sure: {"name": "search", "arguments": {"query": "q"}} and that is all.', "Sure:  and that is all.",
     [("search", {"query": "q"})]),
    (tf.JSON, '{"name": "get_weather", "arguments": {"city": "Par', None, [("get_weather", W | {"city": "Par"})]),
    # Llama 3.1 / 3.2 / 3.3 JSON, with and without <|python_tag|>, "parameters" or "arguments"
    (tf.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", W)]),
    (tf.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", W)]),
    (tf.LLAMA3, '<|python_tag|>{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}', None,
     [("get_time", {"tz": "Asia/Tokyo"})]),
    (tf.LLAMA3, 'I will check the weather. <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
     "I will check the weather.", [("get_weather", W)]),
    (tf.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                '{"name": "get_time", "parameters": {"tz": "CET"}}', "; ",
     [("get_weather", W), ("get_time", {"tz": "CET"})]),
    (tf.LLAMA3, '{"name": "search", "parameters": {"query": "caf\\u00e9 \\"Flore\\"", "limit": 10}}', None,
     [("search", {"query": 'café "Flore"', "limit": 10})]),
    # Llama 3.1 built-in tools (the <|eom_id|> that ends them is a stop token, never in the text)
    (tf.LLAMA3, '<|python_tag|>brave_search.call(query="weather in Paris")', None,
     [("brave_search", {"query": "weather in Paris"})]),
    (tf.LLAMA3, '<|python_tag|>wolfram_alpha.call(query="solve x^2 + 2x = 0")', None,
     [("wolfram_alpha", {"query": "solve x^2 + 2x = 0"})]),
    (tf.LLAMA3, 'Searching now.<|python_tag|>brave_search.call(query="camelid")', "Searching now.",
     [("brave_search", {"query": "camelid"})]),
    # pythonic lists (Llama 3.2 and 4 prompts), Llama 4's <|python_start|> ... <|python_end|>
    (tf.PYTHONIC, '[get_weather(city="Paris")]', None, [("get_weather", W)]),
    (tf.PYTHONIC, '[get_weather(city="Paris"), get_time(tz="CET")]', None,
     [("get_weather", W), ("get_time", {"tz": "CET"})]),
    (tf.PYTHONIC, "[search(query='llamas', limit=5)]", None, [("search", {"query": "llamas", "limit": 5})]),
    (tf.PYTHONIC, 'Let me check both.\n[get_weather(city="Paris", unit="celsius")]', "Let me check both.",
     [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (tf.PYTHONIC, '[search(query="a [b] (c)", limit=1)]', None, [("search", {"query": "a [b] (c)", "limit": 1})]),
    (tf.LLAMA4, '<|python_start|>[get_weather(city="Paris")]<|python_end|>', None, [("get_weather", W)]),
    (tf.LLAMA4, '<|python_start|>[get_weather(city="Paris"), get_time(tz="UTC")]<|python_end|>', None,
     [("get_weather", W), ("get_time", {"tz": "UTC"})]),
    (tf.LLAMA4, 'One moment.<|python_start|>{"name": "get_time", "parameters": {"tz": "UTC"}}<|python_end|>',
     "One moment.", [("get_time", {"tz": "UTC"})]),
    (tf.LLAMA4, '[get_time(tz="UTC")]', None, [("get_time", {"tz": "UTC"})]),
    # Hermes / Qwen <tool_call>
    (tf.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", W)]),
    (tf.HERMES, 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>', "Checking.",
     [("get_time", {"tz": "CET"}), ("search", {"query": "x"})]),
    # negatives: braces and brackets that are no call, never an error
    (tf.JSON, 'The record reads {"name": "Alice", "age": 30}.', 'The record reads {"name": "Alice", "age": 30}.', []),
    (tf.LLAMA3, 'Her card says {"name": "Alice"}', 'Her card says {"name": "Alice"}', []),
    (tf.JSON, '#include <stdio.h>\nint main(void) {\n    int a[3] = {1, 2, 3};\n    printf("%d\\n", a[0]);\n'
              '    return 0;\n}', '#include <stdio.h>\nint main(void) {\n    int a[3] = {1, 2, 3};\n'
                                 '    printf("%d\\n", a[0]);\n    return 0;\n}', []),
    (tf.JSON, '{"name": "get_weather"}', '{"name": "get_weather"}', []),
    (tf.LLAMA3, '{"name": "get_weather"} is the tool I would use.', '{"name": "get_weather"} is the tool I would use.', []),
    (tf.JSON, 'Use `{"arguments": {}, "name": "get_time"}` later.', 'Use `{"arguments": {}, "name": "get_time"}` later.', []),
    (tf.PYTHONIC, 'The list [1, 2, 3] and [unknown_tool(a=1)].', 'The list [1, 2, 3] and [unknown_tool(a=1)].', []),
    (tf.PYTHONIC, 'Call [get_weather] when needed.', 'Call [get_weather] when needed.', []),
    (tf.PYTHONIC, '[get_weather(city=some_variable)]', '[get_weather(city=some_variable)]', []),
    (tf.LLAMA3, '<|python_tag|>print("hello")', 'print("hello")', []),
    (tf.JSON, '{"name": "get_weather_forecast", "arguments": {"city": "Paris"}}',
     '{"name": "get_weather_forecast", "arguments": {"city": "Paris"}}', []),
    (tf.JSON, 'Plain prose with no tool at all.', 'Plain prose with no tool at all.', []),
]


def as_result(content, calls):
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def streamed(fmt, pieces):
    """Feed pieces through the stream reader; join content and each call's deltas back up."""
    s = tf.ToolStream(NAMES, fmt)
    content, calls = "", []
    for out in [s.feed(p) for p in pieces] + [s.finish()]:
        content += out[0]
        for d in out[1]:
            if d.name is not None:
                assert d.index == len(calls), "a call's name comes once, with the next index"
                calls.append([d.name, ""])
            calls[d.index][1] += d.arguments
    assert all(d.name is None or not d.arguments for d in out[1])  # name first, arguments after
    return (content or (None if calls else "")), [(n, json.loads(a)) for n, a in calls]


def test_corpus_size():
    assert len(CORPUS) >= 30
    assert sum(1 for *_, calls in CORPUS if not calls) >= 10
    assert {fmt.name for fmt, *_ in CORPUS} == {"json", "llama3-json", "pythonic", "llama4", "hermes"}


@pytest.mark.parametrize("fmt,text,content,calls", CORPUS, ids=[f"{i}-{c[0].name}" for i, c in enumerate(CORPUS)])
def test_corpus(fmt, text, content, calls):
    got = as_result(*tf.parse(text, NAMES, fmt))
    assert got == (content.strip() if content else content, calls)
    for _, args in got[1]:
        assert isinstance(args, dict)


@pytest.mark.parametrize("fmt,text,content,calls", CORPUS, ids=[f"{i}-{c[0].name}" for i, c in enumerate(CORPUS)])
def test_streamed_at_every_split_equals_unstreamed(fmt, text, content, calls):
    """Every boundary between characters (so every token boundary of any tokenizer): one character at a
    time, and each split into two pieces."""
    whole = as_result(*tf.parse(text, NAMES, fmt))
    assert streamed(fmt, list(text)) == whole
    for k in range(1, len(text)):
        assert streamed(fmt, [text[:k], text[k:]]) == whole, k


def test_stream_never_shows_markup():
    s = tf.ToolStream(NAMES, tf.LLAMA3)
    shown = ""
    for ch in 'Checking <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}':
        shown += s.feed(ch)[0]
    shown += s.finish()[0]
    assert shown == "Checking"


# --- the lazy grammar ---

def constraint(choice, parallel=True, template="no tool syntax"):
    return tool_stage.ToolConstraint(tool_stage.parse_request(
        {"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel}, template))


def feed(c, text: str) -> int | None:
    """Feed text byte by byte; the index of the first refused byte, or None."""
    for i, b in enumerate(text.encode()):
        out = c.try_bytes(bytes([b]))
        if out is None:
            return i
        c.state = out[0]
    return None


def test_auto_is_free_until_a_call_commits():
    c = constraint("auto")
    assert feed(c, 'Prose {"name": "Alice"} and code { x[0] = 1; } <|im_start|> ') is None and c.free
    assert feed(c, '{"name": "get_weather"') is None and not c.free  # a given tool's full name: committed
    assert c.try_bytes(b"}") is None  # no call without its arguments
    saved = c.state
    assert feed(c, ', "arguments": {"town": ') == len(', "arguments": {"')  # only the schema's properties
    c.state = saved
    assert feed(c, ', "arguments": {"city": "Paris"}}') is None and c.free  # the call is over: free again


def test_marker_then_brace_commits_to_a_given_tool():
    c = constraint("auto", template=(DATA / "llama-3.1-8b-instruct.jinja").read_text())
    assert feed(c, "<|python_tag|>{") is None and not c.free
    saved = c.state
    assert feed(c, '"name": "nope"') == len('"name": "')  # no tool's name starts with n
    c.state = saved
    assert feed(c, '"name": "get_time", "parameters": {"tz": "UTC"}}') is None and c.free


def test_required_and_named_from_the_first_byte():
    c = constraint("required")
    assert feed(c, "Hi") == 0
    assert c.completion() == b'{"name":"search","arguments":{"query":""}}'  # the shortest tool name, then its fewest bytes
    assert feed(c, ' {"name": "get_t') is None
    assert c.completion() == b'ime","arguments":{"tz":""}}'
    n = constraint({"type": "function", "function": {"name": "get_time"}})
    assert feed(n, '{"name": "get_w') == len('{"name": "get_')
    n = constraint({"type": "function", "function": {"name": "get_time"}})
    assert feed(n, '{"name": "get_time", "arguments": {"tz": "UTC"}}') is None and n.done  # one call, then the end


def test_parallel_false_ends_after_one_call():
    c = constraint("auto", parallel=False)
    assert feed(c, 'ok {"name": "get_time", "arguments": {"tz": "UTC"}}') is None and c.done
    c = constraint("required", parallel=True)
    assert feed(c, '{"name": "get_time", "arguments": {"tz": "UTC"}}') is None and c.free and not c.done


def valid(name: str, args: dict) -> bool:
    """The schemas' rules, checked by hand (independent of the automaton)."""
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
    props = schema["properties"]
    if set(args) - set(props) or set(schema["required"]) - set(args):
        return False
    for k, v in args.items():
        p = props[k]
        if "enum" in p and v not in p["enum"] or p.get("type") == "string" and not isinstance(v, str):
            return False
        if p.get("type") == "integer" and (not isinstance(v, int) or isinstance(v, bool)):
            return False
    return True


@pytest.mark.parametrize("seed", range(20))
def test_random_walks_give_valid_calls(seed):
    """Random bytes drawn among those the grammar allows (finishing with its completion) always read back as
    calls that satisfy the schemas."""
    rng = random.Random(seed)
    choice = ["required", {"type": "function", "function": {"name": rng.choice(NAMES)}}][seed % 2]
    c = constraint(choice, parallel=False)
    alphabet = [bytes([b]) for b in b' {}[]",:0123456789abcdefghijklmnopqrstuvwxyz_-.tz'] + \
        [b'"city"', b'"tz"', b'"query"', b'"limit"', b'"unit"', b'"celsius"', b'"name"', b'"arguments"'] + \
        [json.dumps(n).encode() for n in NAMES]
    text = b""
    for _ in range(rng.randint(0, 60)):
        options = [a for a in alphabet if c.try_bytes(a) is not None]
        if not options or c.done:
            break
        pick = rng.choice(options)
        c.state = c.try_bytes(pick)[0]
        text += pick
    text += c.completion()
    content, calls = tf.parse(text.decode(), NAMES, tf.JSON)
    assert content is None and len(calls) == 1, text
    assert valid(calls[0].name, json.loads(calls[0].arguments)), text


# --- requests ---

@pytest.mark.parametrize("body,param", [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400s_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        tool_stage.parse_request(body, "")
    assert e.value.status == 400 and e.value.param == param


def test_optional_fields_as_pydantic_writes_them():
    """LangChain and LlamaIndex send Optional[X] as anyOf [X, null]: taken as a type list, so it constrains."""
    params = {"type": "object", "title": "Weather", "properties": {
        "city": {"title": "City", "type": "string"},
        "unit": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Unit"}},
        "required": ["city"]}
    c = tool_stage.ToolConstraint(tool_stage.parse_request(
        {"tools": [{"type": "function", "function": {"name": "w", "parameters": params}}], "tool_choice": "required"},
        ""))
    assert feed(c, '{"name": "w", "arguments": {"city": "x", "unit": null}}') is None
    c = tool_stage.ToolConstraint(c.req)
    assert feed(c, '{"name": "w", "arguments": {"city": "x", "unit": 3') == len('{"name": "w", "arguments": {"city": "x", "unit": ')


def test_detect_formats():
    assert tf.detect((DATA / "llama-3.1-8b-instruct.jinja").read_text()) is tf.LLAMA3
    assert tf.detect("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is tf.JSON
    assert tf.detect("{% if tools %}<tool_call>{% endif %}") is tf.HERMES
    assert tf.detect("<|python_start|>{{ tools }}") is tf.LLAMA4


# --- the prompt of a tool round trip, as transformers renders Meta's template ---

SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<|eom_id|>",
            "<|eot_id|>")


def test_llama31_round_trip_renders_as_transformers(tmp_path):
    """Messages as an OpenAI client sends them (arguments a JSON string) through camelid's prompt path, against
    transformers' apply_chat_template on the same conversation with the arguments as an object (as its docs
    ask): byte-identical, with no argument encoded twice."""
    from gguf_factory import Spec, byte_level_vocab, write_gguf
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from camelid import chat as chat_mod
    from camelid.formats import read

    template = (DATA / "llama-3.1-8b-instruct.jinja").read_text()
    path = tmp_path / "tiny-llama31.gguf"
    write_gguf(path, Spec(), byte_level_vocab(SPECIALS), chat_template=template)
    tok = read(path).tokenizer
    assert tok.chat_template == template

    args = {"city": "Paris", "unit": "celsius"}
    openai_messages = [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "cloudy"}'},
    ]
    req = tool_stage.parse_request({"tools": TOOLS}, template)
    messages, extra = tool_stage.prepare(openai_messages, template, req)
    ids = chat_mod.encode_chat(tok, messages, template, **extra)
    ours = tok.decode(ids, special=True)

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<|begin_of_text|>",
                                 eos_token="<|eot_id|>")
    hf.chat_template = template
    hf_messages = [dict(m) for m in openai_messages]
    hf_messages[2] = {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}}]}
    theirs = hf.apply_chat_template(hf_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert '"parameters": {"city": "Paris", "unit": "celsius"}}' in ours  # one encoding of the arguments
    assert '"description": "Weather now in a city"' in ours  # the tools, in the template's own words
