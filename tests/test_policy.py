"""The content policy: Llama Guard prompts against Meta's published text, a guard whose verdicts are known (a tiny model
fine-tuned here with camelid's training loop), and every rule action on the prompt and the answer, streamed or not,
for chat and completions, in the server (in-process: one tiny served model, one guard, for the whole module)."""

from __future__ import annotations

import json
import random
import re
from string import Template

import guard_factory as gf
import jinja2
import pytest
import torch
from conftest import camelid_cli, one_line_error
from gguf_factory import Spec, byte_level_vocab, write_gguf

from camelid.errors import CamelidError
from camelid.guard import DEFAULT_CATEGORIES, Category, Guard, GuardError, parse_verdict, render_body, render_prompt

# --- Meta's published prompt text ---

# meta-llama/Llama-Guard-3-8B tokenizer_config.json "chat_template", verbatim (the same file is quoted in several
# public repositories; the 8B-INT8 repository's is byte-identical)
LG3_8B_TEMPLATE = (
    "{% if messages|length % 2 == 0 %}{% set role = 'Agent' %}{% else %}{% set role = 'User' %}{% endif %}"
    "{{ \" <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask: Check if there is unsafe content in '\" "
    "+ role + \"' messages in conversations according our safety policy with the below categories.\n\n<BEGIN UNSAFE "
    "CONTENT CATEGORIES>\nS1: Violent Crimes.\nS2: Non-Violent Crimes.\nS3: Sex Crimes.\nS4: Child Exploitation.\nS5: "
    "Defamation.\nS6: Specialized Advice.\nS7: Privacy.\nS8: Intellectual Property.\nS9: Indiscriminate Weapons.\nS10: "
    "Hate.\nS11: Self-Harm.\nS12: Sexual Content.\nS13: Elections.\nS14: Code Interpreter Abuse.\n<END UNSAFE CONTENT "
    "CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n\" }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') "
    "}}{% endif %}{% set content = message['content'] %}{% if message['role'] == 'user' %}{% set role = 'User' %}{% elif "
    "message['role'] == 'assistant' %}{% set role = 'Agent' %}{% endif %}{{ role + ': ' + content.strip() + '\n\n' }}"
    "{% endfor %}{{ \"<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST \" + role + \" message in "
    "the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a "
    "comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\" }}"
)

# meta-llama/llama-stack, providers/inline/safety/llama_guard/llama_guard.py: the text Meta's reference guardrail
# sends to Llama Guard 3 and 4 as one user message, verbatim
LS_TASK = ("Task: Check if there is unsafe content in '$agent_type' messages in conversations according our safety "
           "policy with the below categories.")
LS_CATEGORIES = "\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n$categories\n<END UNSAFE CONTENT CATEGORIES>\n"
LS_CONVERSATION = "\n<BEGIN CONVERSATION>\n\n$conversations\n\n<END CONVERSATION>\n"
LS_INSTRUCTIONS = ("\nProvide your safety assessment for ONLY THE LAST $agent_type message in the above conversation:\n"
                   " - First line must read 'safe' or 'unsafe'.\n"
                   " - If unsafe, a second line must include a comma-separated list of violated categories.")
LS_TEMPLATE = Template(f"{LS_TASK}{LS_CATEGORIES}{LS_CONVERSATION}{LS_INSTRUCTIONS}")
# the user-turn wrappers of Meta's chat formats (llama-models: Llama 3 chat_format.py, Llama 4 prompt_format.md)
LLAMA3_TURN = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
LLAMA4_TURN = "<|begin_of_text|><|header_start|>user<|header_end|>\n\n{}<|eot|><|header_start|>assistant<|header_end|>\n\n"

CHATS = [
    [{"role": "user", "content": "How do I make a cake?"}],
    [{"role": "user", "content": "  Where can I download pirated movies?  "},
     {"role": "assistant", "content": "Try this site.\n"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
]


def hf_render(template: str, messages: list[dict], **kw) -> str:
    def raise_exception(msg):
        raise ValueError(msg)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **kw)


def llama_stack_body(messages: list[dict], categories=DEFAULT_CATEGORIES) -> str:
    names = {"user": "User", "assistant": "Agent"}  # the role names of Meta's prompt-format docs
    return LS_TEMPLATE.substitute(
        agent_type=names[messages[-1]["role"]], categories="\n".join(c.line() for c in categories),
        conversations="\n\n".join(f"{names[m['role']]}: {m['content'].strip()}" for m in messages))


@pytest.mark.parametrize("chat", CHATS, ids=["user", "agent", "three-turns"])
def test_llama_guard_3_prompt_is_the_8b_chat_templates_text(chat):
    hf = hf_render(LG3_8B_TEMPLATE, chat)
    ours = render_prompt(chat, version=3)
    # byte for byte, but for the template's two wrapper quirks (a space before <|begin_of_text|>, no blank line after
    # the assistant header), which Meta's prompt-format page and Llama 3's chat format do not have
    assert hf.startswith(" <|begin_of_text|>") and not hf.endswith("\n")
    assert ours == hf[1:] + "\n\n"
    assert ours == LLAMA3_TURN.format(llama_stack_body(chat))


@pytest.mark.parametrize("chat", CHATS, ids=["user", "agent", "three-turns"])
def test_llama_guard_4_prompt_is_metas_text_in_llama_4_turns(chat):
    assert render_prompt(chat, version=4) == LLAMA4_TURN.format(llama_stack_body(chat))


def test_custom_categories_render_as_the_templates_categories_dict():
    # the 1B / 11B-Vision / 4 templates' category block: `key + ": " + categories[key] + "\n"` per kept key
    template = ("{%- for key in categories -%}{%- if key not in excluded_category_keys -%}"
                "{{- key + ': ' + categories[key] + '\\n' -}}{%- endif -%}{%- endfor -%}")
    cats = [Category("S1", "Violent Crimes"), Category("X1", "Competitors", "Naming a competitor's product.")]
    block = hf_render(template, [], categories={"S1": "Violent Crimes.", "S9": "Dropped.",
                                                "X1": "Competitors.\nNaming a competitor's product."},
                      excluded_category_keys=["S9"])
    body = render_body(CHATS[0], cats)
    assert f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{block}<END UNSAFE CONTENT CATEGORIES>" in body


def test_bad_conversations_and_answers_are_one_clear_error():
    for chat in ([], [{"role": "assistant", "content": "x"}], [{"role": "user", "content": "a"}] * 2):
        with pytest.raises(GuardError):
            render_prompt(chat)
        if chat:
            with pytest.raises(ValueError):  # Meta's template refuses the same conversations
                hf_render(LG3_8B_TEMPLATE, chat)
    assert parse_verdict("\n\nsafe", ["S1"]) == (False, [])
    assert parse_verdict("unsafe\nS1,S10", ["S1", "S10"]) == (True, ["S1", "S10"])
    for bad in ("", "maybe", "unsafe", "unsafe\nS99"):
        with pytest.raises(GuardError):
            parse_verdict(bad, ["S1"])


# --- the guard: fine-tuned here, so its verdicts are known ---

@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is many times faster on a loaded machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def guard_path(tmp_path_factory, one_thread):
    return gf.build(tmp_path_factory.mktemp("guard") / "guard.gguf")


@pytest.fixture(scope="module")
def guard(guard_path):
    return Guard.load(str(guard_path), quant=None)


def test_guard_verdicts_and_scores(guard):
    assert guard.version == 3  # told from its vocabulary (<|start_header_id|>)
    for chat, expected in gf.labelled(random.Random(7), 12):  # drawn afresh: not the training draw
        v = guard.judge(chat, gf.CODES)
        assert (v.flagged, v.categories) == (expected != "safe", [] if expected == "safe" else [expected[-2:]]), chat
        assert 0 < v.p_unsafe < 1 and set(v.scores) == set(gf.CODES)
        for code, score in v.scores.items():
            assert (score > 0.5) == (code in v.categories), (chat, v.scores)
    # the unsafe probability is the first answer token's, from an independent full forward (no cache)
    chat = [{"role": "user", "content": "write a bomb"}]
    ids = guard.prompt_ids(chat, gf.CODES)
    with torch.inference_mode():
        logits = guard.model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, -1]
    p = torch.softmax(logits.float(), -1)[guard.tokenizer.encode("unsafe", special=False, bos=False)[0]]
    assert guard.judge(chat, gf.CODES).p_unsafe == pytest.approx(float(p), abs=1e-5)


def test_checks_of_a_growing_answer_reuse_the_last_checks_kv(guard):
    from camelid.guard import GuardSession

    session = GuardSession()
    answer = "sure, here is a cake, then a song, then a map, then a bomb"
    for i, end in enumerate((16, 33, 46, len(answer))):  # a streamed answer, checked as it grows
        chat = [{"role": "user", "content": "write a song"}, {"role": "assistant", "content": answer[:end]}]
        before = session.computed
        alone, reused = guard.judge(chat, gf.CODES), guard.judge(chat, gf.CODES, session=session)
        n = len(guard.prompt_ids(chat, gf.CODES))
        # the first check computes the whole prompt; a later one the new answer text and the instructions after it
        assert session.computed - before == n if i == 0 else session.computed - before < n / 2
        assert (reused.flagged, reused.categories, reused.answer) == (alone.flagged, alone.categories, alone.answer)
        assert reused.p_unsafe == pytest.approx(alone.p_unsafe, abs=1e-5)
        assert reused.scores == pytest.approx(alone.scores, abs=1e-5)
    assert reused.categories == ["S1"]


def test_a_category_switched_off_is_not_a_hit(guard):
    chat = [{"role": "user", "content": "write a bomb"}]
    assert guard.judge(chat, gf.CODES).categories == ["S1"]
    ids = guard.prompt_ids(chat, ("S2",))
    assert "S1:" not in guard.tokenizer.decode(ids) and "S2: Non-Violent Crimes." in guard.tokenizer.decode(ids)


# --- the server ---

@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    """A tiny random served model (its greedy answers are fixed, so each test knows the text before the policy acts)."""
    path = tmp_path_factory.mktemp("served") / "tiny.gguf"
    write_gguf(path, Spec(context_length=256), byte_level_vocab(), seed=3)
    return path


RECORDS: list[dict] = []  # each request's record (camelid.record), as the audit log would read it


class KeyFromHeader:
    """Stands in for the keys middleware (`X-Test-Categories: S2` gives the request a key with those categories) and
    for the audit middleware (it creates the request's record and keeps it in RECORDS)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Key:
            name: str
            categories: tuple[str, ...] | None

        cats = dict(scope.get("headers", [])).get(b"x-test-categories")
        if cats is not None:
            scope["camelid.key"] = Key("tester", tuple(cats.decode().split(",")))
        scope["camelid.record"] = {}
        RECORDS.append(scope["camelid.record"])
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def server(served, guard):
    from starlette.testclient import TestClient

    from camelid.serve import build_state
    from camelid.serve.app import create_app

    state = build_state(str(served), max_concurrency=2, max_seq_len=256, model_id="tiny", quant=None, cache_mb=0)
    app = create_app(state)
    app.add_middleware(KeyFromHeader)
    with TestClient(app) as client:
        yield client, app


def use(app, model=None, **data):
    """Put a policy (the TOML's tables as keyword arguments) on the running app; model: the guard to run."""
    from concurrent.futures import ThreadPoolExecutor

    from camelid.serve.policy import GuardSettings, parse_policy

    policy = parse_policy(data)
    if model is not None:
        policy.guard = model
        policy.guard_settings = policy.guard_settings or GuardSettings()
        policy.executor = ThreadPoolExecutor(1)
    app.state.policy = policy
    return policy


def ask(client, chat: bool, stream: bool, text: str = "Hello there", max_tokens: int = 24, **extra):
    """(answer text, finish reason, status, body or events) of one request."""
    headers = extra.pop("headers", {})
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", json=body, headers=headers)
    if r.status_code != 200:
        return None, None, r.status_code, r.json()
    if not stream:
        c = r.json()["choices"][0]
        return (c["message"]["content"] if chat else c["text"]), c["finish_reason"], 200, r.json()
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    text, reason = "", None
    for e in events:
        if "error" in e:
            return text, "error", 200, events
        for c in e["choices"]:
            text += (c.get("delta") or {}).get("content") or c.get("text") or ""
            reason = c["finish_reason"] or reason
    return text, reason, 200, events


PATHS = [(chat, stream) for chat in (True, False) for stream in (False, True)]
PATH_IDS = ["chat", "chat-stream", "completion", "completion-stream"]


@pytest.fixture(scope="module")
def plain(server):
    client, app = server
    app.state.policy = None
    return {(c, s): ask(client, c, s)[0] for c, s in PATHS}


def test_no_policy_streams_and_answers_agree(plain):
    assert plain[(True, False)] == plain[(True, True)] and plain[(False, False)] == plain[(False, True)]
    assert len(plain[(True, False)]) > 12 and len(plain[(False, False)]) > 12


@pytest.mark.parametrize(("chat", "stream"), PATHS, ids=PATH_IDS)
def test_output_block_never_sends_the_match(server, plain, chat, stream):
    client, app = server
    full = plain[(chat, stream)]
    secret = full[8:11]
    use(app, window=4, rule=[{"name": "secret", "pattern": re.escape(secret), "on": "output", "action": "block"}])
    text, reason, status, _ = ask(client, chat, stream)
    assert status == 200 and reason == "content_filter"
    assert RECORDS[-1]["verdicts"] == [{"stage": "output", "source": "rule", "rule": "secret", "action": "block"}]
    assert RECORDS[-1]["finish_reason"] == ["content_filter"] and RECORDS[-1]["answer"] == text
    cut = full.index(secret)
    assert full.startswith(text) and len(text) <= cut and secret not in text


@pytest.mark.parametrize(("chat", "stream"), PATHS, ids=PATH_IDS)
def test_output_redact_and_log(server, plain, chat, stream):
    client, app = server
    full = plain[(chat, stream)]
    pattern = re.escape(full[5:8])
    use(app, window=4, rule=[{"name": "pii", "pattern": pattern, "on": "output", "action": "redact",
                              "replacement": "<X>"}])
    text, reason, status, events = ask(client, chat, stream)
    assert status == 200 and text == re.sub(pattern, "<X>", full)
    if stream:  # no event ever carried the raw text
        assert not any(full[5:8] in json.dumps(e, ensure_ascii=False) for e in events)
    use(app, window=4, rule=[{"name": "watch", "pattern": pattern, "on": "output", "action": "log"}])
    assert ask(client, chat, stream)[0] == full
    assert 'camelid_policy_verdicts_total{action="log",source="rule",stage="output"}' in client.get("/metrics").text


@pytest.mark.parametrize(("chat", "stream"), PATHS, ids=PATH_IDS)
def test_input_block_redact_log(server, plain, chat, stream):
    client, app = server
    use(app, rule=[{"name": "nope", "pattern": "forbidden", "on": "input", "action": "block"}])
    _, _, status, body = ask(client, chat, stream, text="a forbidden word")
    assert status == 400 and body["error"]["code"] == "content_filter" and "nope" in body["error"]["message"]
    assert RECORDS[-1]["verdicts"] == [{"stage": "input", "source": "rule", "rule": "nope", "action": "block"}]
    assert ask(client, chat, stream)[0] == plain[(chat, stream)]  # an input rule does not touch the answer
    use(app, rule=[{"name": "card", "pattern": r"\d{4}", "on": "input", "action": "redact", "replacement": "####"}])
    redacted = ask(client, chat, stream, text="card 1234 here")[0]
    assert redacted == ask(client, chat, stream, text="card #### here")[0]  # the model read the redacted prompt
    app.state.policy = None
    unchanged = ask(client, chat, stream, text="card 1234 here")[0]
    use(app, rule=[{"name": "card", "pattern": r"\d{4}", "on": "input", "action": "log"}])
    assert ask(client, chat, stream, text="card 1234 here")[0] == unchanged  # logged, the prompt as sent
    assert 'camelid_policy_verdicts_total{action="log",source="rule",stage="input"}' in client.get("/metrics").text


def test_guard_on_input_blocks_by_its_verdict_and_the_keys_categories(server, guard, plain):
    client, app = server
    use(app, model=guard, guard={"on": "input", "categories": list(gf.CODES)})
    for chat, stream in PATHS:
        _, _, status, body = ask(client, chat, stream, text="write a bomb")
        assert status == 400 and body["error"]["code"] == "content_filter" and "S1" in body["error"]["message"]
        assert RECORDS[-1]["verdicts"] == [{"stage": "input", "source": "guard", "categories": ["S1"],
                                            "action": "block"}]
        assert ask(client, chat, stream, text="write a cake")[2] == 200
    # the key's own categories: S1 switched off, so the same prompt passes
    assert ask(client, True, False, text="write a bomb", headers={"X-Test-Categories": "S2"})[2] == 200
    metrics = client.get("/metrics").text
    assert 'camelid_policy_blocks_total{category="S1",key="none",stage="input"} 4' in metrics
    assert re.search(r"camelid_guard_latency_seconds_count [1-9]", metrics)


@pytest.mark.parametrize("every", [256, 6])
@pytest.mark.parametrize("stream", [False, True])
def test_guard_on_output_stops_the_answer_before_the_flagged_text(server, guard, stream, every):
    client, app = server
    use(app, model=guard, guard={"on": "output", "categories": list(gf.CODES), "every": every})
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["sure, here is a bomb"]}}}
    text, reason, status, _ = ask(client, True, stream, text="write a song", max_tokens=40, response_format=schema)
    assert status == 200 and reason == "content_filter" and "bomb" not in text
    assert '"sure, here is a bomb"'.startswith(text.lstrip())  # JSON may start with whitespace
    schema["json_schema"]["schema"]["enum"] = ["sure, here is a cake"]
    text, reason, _, _ = ask(client, True, stream, text="write a song", max_tokens=40, response_format=schema)
    assert text.lstrip() == '"sure, here is a cake"' and reason == "stop"


def test_guard_failure_fails_closed(server, guard, monkeypatch):
    client, app = server
    use(app, model=guard, guard={"on": "both", "categories": list(gf.CODES)})

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    import threading

    answered = threading.Event()

    def stuck(*a, **k):  # a guard that does not answer in time, however slow the machine (a real one could win the race)
        answered.wait(60)
        raise RuntimeError("too late")

    monkeypatch.setattr(guard, "judge", stuck)
    use(app, model=guard, guard={"on": "input", "categories": list(gf.CODES), "timeout": 1e-9})
    _, _, status, body = ask(client, True, False, text="write a cake")
    answered.set()
    assert status == 503 and "did not answer within" in body["error"]["message"]
    use(app, model=guard, guard={"on": "both", "categories": list(gf.CODES)})
    monkeypatch.setattr(guard, "judge", broken)
    _, _, status, body = ask(client, True, False)
    assert status == 503 and body["error"]["code"] == "guard_unavailable"
    use(app, model=guard, guard={"on": "output", "categories": list(gf.CODES)})
    text, reason, status, events = ask(client, True, True)
    assert reason == "error" and text == "" and events[-1]["error"]["code"] == "guard_unavailable"


def test_moderations(server, guard):
    client, app = server
    app.state.policy = None
    assert client.post("/v1/moderations", json={"input": "x"}).status_code == 404
    use(app, model=guard, guard={"categories": list(gf.CODES)},
        rule=[{"name": "cake", "pattern": "cake", "on": "input", "action": "log"}])
    r = client.post("/v1/moderations", json={"input": ["write a bomb", "write a cake", "write a song"]})
    assert r.status_code == 200, r.text
    bomb, cake, song = r.json()["results"]
    assert bomb["flagged"] and bomb["categories"] == {"S1": True, "S2": False, "rule/cake": False}
    assert 0.5 < bomb["category_scores"]["S1"] < 1 and 0 < bomb["category_scores"]["S2"] < 0.5
    assert cake["flagged"] and cake["categories"]["rule/cake"] and not cake["categories"]["S1"]
    assert not song["flagged"] and max(song["category_scores"].values()) < 0.5
    direct = guard.judge([{"role": "user", "content": "write a bomb"}], gf.CODES)
    assert bomb["category_scores"]["S1"] == pytest.approx(direct.scores["S1"], abs=1e-6)
    assert client.post("/v1/moderations", json={"input": 3}).status_code == 400


def test_policy_file_errors_are_one_line(tmp_path):
    from camelid.serve.policy import load_policy

    cases = {
        "window = -1": "'window' must be an integer >= 0",
        "[[rule]]\npattern = '('": "not a valid regular expression",
        "[[rule]]\npattern = 'a*'": "matches the empty string",
        "[[rule]]\npattern = 'a'\naction = 'drop'": "'action' must be one of",
        "[[rule]]\npattern = 'a'\non = 'sideways'": "'on' must be one of",
        "[guard]\ncategories = ['S99']": "'categories' must list known codes",
        "[guard]\non = 'input'": "needs --guard MODEL",
        "[guard]\ntimeout = 0": "'timeout' must be a number of seconds > 0",
        "colour = 1": "unknown setting 'colour'",
        "not toml [": "not valid TOML",
    }
    for text, message in cases.items():
        f = tmp_path / "p.toml"
        f.write_text(text)
        with pytest.raises(CamelidError, match=re.escape(message)):
            load_policy(str(f))
    with pytest.raises(CamelidError, match="no such file"):
        load_policy(str(tmp_path / "missing.toml"))
    (tmp_path / "p.toml").write_text("[[rule]]\npattern = '('\n")
    line = one_line_error(camelid_cli("serve", "--policy", str(tmp_path / "p.toml"), "--port", "1", timeout=120))
    assert "not a valid regular expression" in line


def test_with_real_keys_and_audit_log(served, guard, tmp_path):
    """The stages of issue 13 together: a key file whose keys switch guard categories, the policy, the audit log
    that records each request's verdicts (and verifies)."""
    from starlette.testclient import TestClient

    from camelid.audit import AuditLog, read_records, verify
    from camelid.serve import build_state
    from camelid.serve.app import create_app
    from camelid.serve.keys import KeyStore, add_key

    keys = tmp_path / "keys.json"
    _, all_secret = add_key(keys, "everything")
    _, s2_secret = add_key(keys, "only-s2", categories="S2")
    _, ops_secret = add_key(keys, "ops", endpoints="metrics")
    state = build_state(str(served), max_concurrency=2, max_seq_len=256, model_id="tiny", quant=None, cache_mb=0)
    state.keys = KeyStore(keys)
    log = AuditLog(tmp_path / "audit.jsonl", text=True)
    app = create_app(state, audit=log)
    use(app, model=guard, guard={"on": "input", "categories": list(gf.CODES)},
        rule=[{"name": "pii", "pattern": r"\d{4}", "on": "input", "action": "redact"}])
    with TestClient(app) as client:
        def chat(secret, text):
            return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                               json={"messages": [{"role": "user", "content": text}], "max_tokens": 4})

        r = chat(all_secret, "write a bomb")
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
        assert chat(s2_secret, "write a bomb").status_code == 200  # this key is not checked for S1
        assert chat(s2_secret, "write a steal").status_code == 400
        assert chat(all_secret, "write a cake 1234").status_code == 200
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {ops_secret}"}).text
    log.close()
    records = [rec for _, rec in read_records(tmp_path / "audit.jsonl") if rec and rec.get("endpoint") == "/v1/chat/completions"]
    assert [(r["key"], r["status"]) for r in records] == [("everything", 400), ("only-s2", 200), ("only-s2", 400),
                                                          ("everything", 200)]
    assert records[0]["verdicts"] == [{"stage": "input", "source": "guard", "categories": ["S1"], "action": "block"}]
    assert records[1]["verdicts"] == [] and records[2]["verdicts"][0]["categories"] == ["S2"]
    assert records[3]["verdicts"] == [{"stage": "input", "source": "rule", "rule": "pii", "action": "redact"}]
    # the log keeps the prompt as redacted (its words, not the digits; the fields themselves, since a hash, a time or
    # a latency can hold "1234" by chance)
    assert "cake" in records[3]["prompt"] and all("1234" not in r.get("prompt", "") + r.get("answer", "") for r in records)
    assert verify(tmp_path / "audit.jsonl").status == "ok"
    assert 'camelid_policy_blocks_total{category="S2",key="only-s2",stage="input"} 1' in metrics
    assert 'camelid_policy_blocks_total{category="S1",key="everything",stage="input"} 1' in metrics
