"""The web chat page (camelid/serve/static/index.html) in Debian's headless chromium through Playwright.

The fast tests serve the packaged page (with its real Content-Security-Policy) and canned OpenAI-style answers
through Playwright's request routing, so Markdown, XSS safety and the error displays are checked exactly and
without a model. The slow test drives a real server with the default model on 127.0.0.1. Every wait is on a DOM
condition with a generous timeout (no fixed sleeps); screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import time
from pathlib import Path

import pytest
from conftest import running_server

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CAMELID_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("CAMELID_TEST_ARTIFACTS", REPO / "test-artifacts"))
ORIGIN = "http://127.0.0.1:59999"  # routed by Playwright, never reached; loopback is a secure context (clipboard)
KEY = "web-key-42"
MODEL = "smollm2-135m-instruct"
LONG = 180_000  # ms: one answer from the default model on a loaded 2-core machine


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM} (the set-up installs Debian's chromium: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    packaged_page()  # before Playwright's event loop runs in this thread
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@functools.cache
def packaged_page() -> tuple[str, str]:
    """The page and its CSP exactly as the server's / handler returns them."""
    from camelid.serve.app import index

    resp = asyncio.run(index(None))
    return resp.body.decode(), resp.headers["content-security-policy"]


def chunk(content: str | None = None, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
            "choices": [{"index": 0, "delta": {"content": content} if content else {}, "logprobs": None,
                         "finish_reason": finish}]}


def sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def stream_of(text: str, prompt_tokens: int, finish: str = "stop") -> str:
    pieces = re.findall(r"\s*\S+", text) or [text]
    usage = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": [],
             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces) + 1,
                       "total_tokens": prompt_tokens + len(pieces) + 1}}
    return sse(*(chunk(p) for p in pieces), chunk(finish=finish), usage)


class FakeServer:
    """The page at ORIGIN; /v1/models and /v1/chat/completions answered from a queue of canned replies."""

    def __init__(self, page, key: str | None = None) -> None:
        self.html, self.csp = packaged_page()
        self.key, self.replies, self.requests = key, [], []
        page.route(ORIGIN + "/**", self.handle)

    def handle(self, route) -> None:
        req = route.request
        path = req.url[len(ORIGIN):]
        if path == "/":
            return route.fulfill(body=self.html, content_type="text/html", headers={"Content-Security-Policy": self.csp})
        if self.key and req.headers.get("authorization") != f"Bearer {self.key}":
            return route.fulfill(status=401, content_type="application/json", headers={"WWW-Authenticate": "Bearer"},
                                 body=json.dumps({"error": {"message": "a valid API key is needed", "type":
                                                            "authentication_error", "param": None,
                                                            "code": "invalid_api_key"}}))
        if path == "/v1/models":
            return route.fulfill(content_type="application/json",
                                 body=json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
        if path != "/v1/chat/completions":
            return route.fulfill(status=404, body="{}", content_type="application/json")
        self.requests.append({"body": json.loads(req.post_data), "auth": req.headers.get("authorization")})
        reply = self.replies.pop(0)
        if reply == "network":
            return route.abort("connectionrefused")
        status, headers, body = reply
        route.fulfill(status=status, headers=headers, body=body,
                      content_type="text/event-stream" if status == 200 else "application/json")


def new_page(browser, **kw):
    context = browser.new_context(**kw)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=ORIGIN)
    page = context.new_page()
    return context, page


def last_answer(page):
    return page.locator("#log .msg.assistant").last


def ask(page, text: str, timeout: int = 30_000):
    """Send text; return the new answer once it is no longer streaming."""
    n = page.locator("#log > .msg").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(f"#log > .msg.assistant:nth-child({n + 2})")
    page.locator(f"#log > .msg.assistant:nth-child({n + 2}):not([data-state='streaming'])").wait_for(timeout=timeout)
    return answer


MARKDOWN = """## Plan

Use **bold**, *italic* and `inline <b>code</b>`.

- first
- second
  - nested
1. one
2. two

```python
def f(x):
    return x < 2 and "<b>"
```

| a | b |
|---|---|
| 1 | 2 |

A [good link](https://example.com/docs) and a [bad one](javascript:alert%281%29).
Raw: <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>"""

CODE = 'def f(x):\n    return x < 2 and "<b>"'


def test_markdown_renders_and_model_text_never_becomes_html(browser):
    context, page = new_page(browser)
    try:
        fake = FakeServer(page)
        fake.replies.append((200, {}, stream_of(MARKDOWN, prompt_tokens=12)))
        page.goto(ORIGIN + "/")
        page.locator("#model option[value='fake-model']").wait_for(state="attached")
        answer = ask(page, "<img src=y onerror=\"window.__xss=3\"> show me markdown")
        body = answer.locator(".body")
        assert body.locator("h2").inner_text() == "Plan"
        assert body.locator("strong").inner_text() == "bold" and body.locator("em").inner_text() == "italic"
        assert body.locator("p code").inner_text() == "inline <b>code</b>"
        assert body.locator(":scope > ul > li").count() == 2 and body.locator("ul ul > li").inner_text() == "nested"
        assert body.locator("ol > li").all_inner_texts() == ["one", "two"]
        code = body.locator(".code pre code")
        assert code.inner_text() == CODE and code.get_attribute("data-lang") == "python"
        assert body.locator("table td").all_inner_texts() == ["1", "2"]
        links = body.locator("a")
        assert links.count() == 1 and links.get_attribute("href") == "https://example.com/docs"
        assert "[bad one](javascript:alert%281%29)" in body.inner_text()
        # the XSS strings, in the answer and in the user's own message, stay text
        assert page.locator("#log img, #log script").count() == 0
        assert '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>' in body.inner_text()
        assert page.locator(".msg.user").inner_text().startswith("<img src=y")
        assert page.evaluate("window.__xss") is None
        # the copy button copies the code exactly
        copy = answer.locator(".code button.copy")
        copy.click()
        page.locator(".code button.copy", has_text="Copied").wait_for()
        assert page.evaluate("navigator.clipboard.readText()") == CODE
        meta = answer.locator(".meta")
        assert meta.get_attribute("data-completion") == str(len(re.findall(r"\s*\S+", MARKDOWN)) + 1)
        assert meta.get_attribute("data-prompt") == "12" and "prompt 12" in meta.inner_text()
        sent = fake.requests[0]["body"]
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert sent["model"] == "fake-model" and [m["role"] for m in sent["messages"]] == ["system", "user"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-web-markdown-light.png"), full_page=True)
        dark_context, dark = new_page(browser, color_scheme="dark")
        try:
            FakeServer(dark)
            stored = page.evaluate("[localStorage.getItem('camelid.conversations'), localStorage.getItem('camelid.current')]")
            convs, current = (json.dumps(v) for v in stored)
            dark.add_init_script(f"localStorage.setItem('camelid.conversations', {convs}); "
                                 f"localStorage.setItem('camelid.current', {current})")
            dark.goto(ORIGIN + "/")
            dark.locator("#log .code pre").wait_for()
            dark.screenshot(path=str(ARTIFACTS / "serve-web-markdown-dark.png"), full_page=True)
        finally:
            dark_context.close()
    finally:
        context.close()


def test_errors_are_shown_in_the_page(browser):
    context, page = new_page(browser)
    try:
        fake = FakeServer(page, key="good")
        page.goto(ORIGIN + "/")
        notice = page.locator("#notice")
        notice.locator("form.keyform").wait_for()  # the model list needed a key
        assert "API key" in notice.inner_text()
        # 401 on a chat request: the message, and a key field that saves the key and retries
        answer = ask(page, "hello")
        problem = answer.locator(".problem[data-kind='auth']")
        assert problem.get_attribute("data-status") == "401" and "needs a valid API key" in problem.inner_text()
        fake.replies.append((200, {}, stream_of("Hi there.", prompt_tokens=9)))
        problem.locator("input.key-input").fill("good")
        problem.locator("button", has_text="Save key and retry").click()
        page.locator("#log .msg.assistant[data-state='done'] .body", has_text="Hi there.").wait_for()
        assert fake.requests[-1]["auth"] == "Bearer good"
        assert page.evaluate("localStorage.getItem('camelid_api_key')") == "good"
        assert page.locator("#log .msg.assistant").count() == 1  # the retry replaced the failed answer
        notice.wait_for(state="hidden")
        # 429: busy, with the Retry-After the server gave
        fake.replies.append((429, {"Retry-After": "7"}, json.dumps(
            {"error": {"message": "the server is busy (queue full)", "type": "rate_limit_error", "param": None,
                       "code": "rate_limit_exceeded"}})))
        problem = ask(page, "again").locator(".problem[data-kind='busy']")
        text = problem.inner_text()
        assert "busy (429)" in text and "Try again in 7 s" in text and problem.locator("button.retry").count() == 1
        # content filtered: the text so far, then the notice
        fake.replies.append((200, {}, stream_of("Here is part", prompt_tokens=20, finish="content_filter")))
        problem.locator("button.retry").click()
        answer = last_answer(page)
        answer.locator(".problem[data-kind='content_filter']").wait_for()
        assert "content filtered" in answer.inner_text() and answer.locator(".body").inner_text() == "Here is part"
        # a prompt the content policy blocked (HTTP 400, code content_filter): shown as blocked, nothing generated
        fake.replies.append((400, {}, json.dumps({"error": {
            "message": "the prompt was blocked by the server's content policy (rule 'secret')",
            "type": "invalid_request_error", "param": None, "code": "content_filter"}})))
        problem = ask(page, "tell me the secret").locator(".problem[data-kind='blocked']")
        assert "filtered" in problem.get_attribute("class")
        assert "Blocked: the prompt was blocked by the server's content policy (rule 'secret')" in problem.inner_text()
        assert "Nothing was generated" in problem.inner_text()
        # an error inside the stream, and a server that cannot be reached
        fake.replies.append((200, {}, sse(chunk("Half"), {"error": {"message": "generation failed: boom"}})))
        assert "failed while answering: generation failed: boom" in ask(page, "x").locator(".problem").inner_text()
        fake.replies.append("network")
        problem = ask(page, "y").locator(".problem[data-kind='network']")
        assert "Could not reach the server" in problem.inner_text()
        page.screenshot(path=str(ARTIFACTS / "serve-web-errors.png"), full_page=True)
    finally:
        context.close()


# --- a real server with the default model ---

@pytest.fixture(scope="module")
def server(default_model_path):
    pytest.importorskip("httpx")
    flags = ["--api-key", KEY, "--model-id", MODEL, "--max-concurrency", "2", "--max-seq-len", "1024",
             "--log-level", "warning", "--reference"]
    with running_server(default_model_path, *flags) as (base, _):
        yield base


def running_sequences(base: str) -> float:
    import httpx

    for line in httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines():
        if line.startswith("camelid_running_sequences "):
            return float(line.split()[1])
    raise AssertionError("camelid_running_sequences not in /metrics")


@pytest.mark.slow
def test_web_chat_against_the_real_server(browser, server):
    import httpx

    context = browser.new_context()
    page = context.new_page()
    page.on("dialog", lambda d: d.accept())
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    try:
        page.goto(server + "/")
        page.locator("#notice form.keyform").wait_for(timeout=30_000)  # the server wants a key
        page.click("#settings_toggle")
        page.fill("#api_key", "wrong-key")
        page.dispatch_event("#api_key", "change")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "60")
        # a wrong key: the 401 message with a key field; the right key answers
        answer = ask(page, "Write a Python function that adds two numbers.", timeout=30_000)
        problem = answer.locator(".problem[data-kind='auth']")
        assert "needs a valid API key" in problem.inner_text()
        problem.locator("input.key-input").fill(KEY)
        problem.locator("button", has_text="Save key and retry").click()
        done = page.locator("#log .msg.assistant[data-state='done']")
        done.wait_for(timeout=LONG)
        page.locator(f"#model option[value='{MODEL}']").wait_for(state="attached")
        assert page.locator("#model").input_value() == MODEL
        # Markdown from the model: a fenced code block with its copy button
        assert "def " in done.locator(".code pre code").first.inner_text()
        assert done.locator(".code button.copy").count() >= 1
        # token counts: prompt tokens as /tokenize counts the messages sent, completion within max_tokens, a rate
        meta = done.locator(".meta")
        counted = httpx.post(server + "/tokenize", json={"messages": sent[-1]["messages"]},
                             headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
        assert int(meta.get_attribute("data-prompt")) == counted
        assert 0 < int(meta.get_attribute("data-completion")) <= 60
        assert float(meta.get_attribute("data-rate")) > 0 and re.search(r"\d+\.\d tok/s", meta.inner_text())
        first_answer = done.locator(".body").inner_text()
        first_request = sent[-1]
        page.screenshot(path=str(ARTIFACTS / "serve-web-real-code.png"), full_page=True)
        # a second conversation: a list
        page.click("#new_chat")
        answer = ask(page, "Name three fruits as a numbered list.", timeout=LONG)
        assert answer.locator(".body li").count() >= 2
        second_answer = answer.locator(".body").inner_text()
        # both survive a reload; the sidebar switches between them
        page.reload()
        page.locator("#convs li.conv").nth(1).wait_for()
        assert page.locator("#convs li.conv").count() == 2
        assert last_answer(page).locator(".body").inner_text() == second_answer
        page.locator("#convs li.conv", has_text="Write a Python function").locator("button.open").click()
        page.locator("#log .msg.user", has_text="Write a Python function").wait_for()
        assert last_answer(page).locator(".body").inner_text() == first_answer
        # regenerate replaces the last answer: the same messages are sent again, one answer stays
        page.click("#settings_toggle")
        page.fill("#temperature", "1.0")
        page.fill("#seed", "7")
        n_before = len(sent)
        last_answer(page).locator("button.regenerate").click()
        page.locator("#log .msg.assistant[data-state='done']").wait_for(timeout=LONG)  # the old answer went on click
        assert len(sent) == n_before + 1 and sent[-1]["messages"] == first_request["messages"]
        assert page.locator("#log .msg.assistant").count() == 1
        regenerated = last_answer(page).locator(".body").inner_text()
        assert regenerated != first_answer  # seed 7 at temperature 1 samples a different answer
        stored = json.loads(page.evaluate("localStorage.getItem('camelid.conversations')"))
        conv = next(c for c in stored if c["title"].startswith("Write a Python"))
        assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
        # stop a long answer midway: the slot is freed and the page is ready again
        page.fill("#temperature", "0")
        page.fill("#seed", "")
        page.fill("#max_tokens", "800")
        page.fill("#input", "Write a very long story about a camel.")
        page.press("#input", "Enter")
        page.locator("#log .msg.assistant[data-state='streaming'] .body p").first.wait_for(timeout=LONG)
        page.click("#stop")
        stopped = page.locator("#log .msg.assistant[data-state='stopped']")
        stopped.wait_for(timeout=30_000)
        assert "stopped" in stopped.locator(".meta").inner_text()
        assert page.is_enabled("#send") and page.is_visible("#send") and not page.is_visible("#stop")
        deadline = time.time() + 30
        while running_sequences(server) and time.time() < deadline:
            time.sleep(0.1)  # polling the server's gauge, not a fixed wait
        assert running_sequences(server) == 0
        page.screenshot(path=str(ARTIFACTS / "serve-web-real-stopped.png"), full_page=True)
        # delete a conversation; the deletion survives a reload too
        page.locator("#convs li.conv", has_text="Name three fruits").locator("button.del").click()
        page.reload()
        page.locator("#convs li.conv").first.wait_for()
        assert page.locator("#convs li.conv").all_inner_texts()[0].startswith("Write a Python")
        assert page.locator("#convs li.conv").count() == 1
    finally:
        context.close()


RENDER_CASES = [
    ("plain <b>x</b> & y", "<p>plain &lt;b&gt;x&lt;/b&gt; &amp; y</p>"),
    ("snake_case_name and 2 * 3 * 4", "<p>snake_case_name and 2 * 3 * 4</p>"),
    ("**bold _and it_**", "<p><strong>bold <em>and it</em></strong></p>"),
    ("[a](JAVASCRIPT:alert%281%29) [b](data:text/html,x) [c](/relative) [d](mailto:x@y.z)",
     '<p>[a](JAVASCRIPT:alert%281%29) [b](data:text/html,x) [c](/relative) '
     '<a href="mailto:x@y.z" target="_blank" rel="noopener noreferrer nofollow">d</a></p>'),
    ("see https://example.com/a_b.", '<p>see <a href="https://example.com/a_b" target="_blank" '
     'rel="noopener noreferrer nofollow">https://example.com/a_b</a>.</p>'),
    ("# Title #\n> quoted *x*", "<h1>Title</h1><blockquote><p>quoted <em>x</em></p></blockquote>"),
    ("```js\nlet a = '<i>';", None),  # an unclosed fence (still streaming) is code to the end
    ("1. step\n   ```sh\n   ls -l\n   ```\n2. next", None),
    ("line one\nline two\n\nnext paragraph", "<p>line one<br>line two</p><p>next paragraph</p>"),
]


def test_markdown_renderer_cases(browser):
    context, page = new_page(browser)
    try:
        FakeServer(page)
        page.goto(ORIGIN + "/")
        render = "(src) => { const d = document.createElement('div'); d.appendChild(renderMarkdown(src)); return d; }"
        for src, want in RENDER_CASES:
            if want is not None:
                assert page.evaluate(f"(src) => ({render})(src).innerHTML", src) == want, src
        code = page.evaluate(f"(src) => {{ const c = ({render})(src).querySelector('pre code'); "
                             "return [c.textContent, c.dataset.lang]; }", RENDER_CASES[6][0])
        assert code == ["let a = '<i>';", "js"]
        items = page.evaluate(f"(src) => [...({render})(src).querySelectorAll('ol > li')].map("
                              "(li) => [li.firstChild.textContent, li.querySelector('pre code')?.textContent ?? null])",
                              RENDER_CASES[7][0])
        assert items == [["step", "ls -l"], ["next", None]]
    finally:
        context.close()
