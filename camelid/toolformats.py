"""Tool-call formats as data about a chat template: how a template takes tools, and how calls read back.

`detect(template)` names the format a model's own template speaks:

  llama3-json  Llama 3.1 / 3.2 / 3.3: `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`;
               Llama 3.1 built-in tools as `<|python_tag|>brave_search.call(query="...")` (ends at `<|eom_id|>`)
  llama4       Llama 4: `<|python_start|>` ... `<|python_end|>` around JSON calls or a pythonic list
  pythonic     templates that ask for `[func_name1(params_name1=params_value1, ...)]` (Llama 3.2 / 4 style)
  hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen, Hermes)
  json         camelid's own format, for templates with no tool syntax (the default model's): the tools are
               described in a system message, a call is one JSON object per call,
               `{"name": "<tool name>", "arguments": {<argument name>: <value>, ...}}`, earlier calls are
               written that way in the assistant's turn and results come back in a user turn
               ("The tool NAME returned: ...", see camelid/serve/tools.py)

Reading is the same permissive scan for every format, so a model that mixes styles still works: a JSON call
is an object that starts `{"name": "<one of the given tool names>", "arguments"|"parameters": ` (a bare
object, one in a JSON list, or after a marker); a pythonic call is a list `[f(a=1), g(b="x")]` whose
functions are given tools. Anything else, braces included, is content. `scan` works on a prefix of the
output too (for streaming): what it reports as settled never changes when more text comes.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

MAX_WS = 16  # whitespace allowed between the parts of a call's opening


@dataclass(frozen=True)
class ToolFormat:
    name: str
    native: bool  # the template renders `tools` itself (else camelid describes them in a system message)
    key: str  # the arguments key the format writes: "parameters" or "arguments"
    markers: tuple[tuple[str, str | None], ...] = ()  # (opening, closing) around calls


JSON = ToolFormat("json", False, "arguments")
LLAMA3 = ToolFormat("llama3-json", True, "parameters", (("<|python_tag|>", None),))
LLAMA4 = ToolFormat("llama4", True, "parameters", (("<|python_start|>", "<|python_end|>"),))
PYTHONIC = ToolFormat("pythonic", True, "parameters", (("<|python_start|>", "<|python_end|>"),))
HERMES = ToolFormat("hermes", True, "arguments", (("<tool_call>", "</tool_call>"),))
GENERIC = ToolFormat("generic", True, "arguments")  # a template with a `tools` variable in a syntax not listed


@lru_cache(maxsize=32)
def detect(template: str) -> ToolFormat:
    """The tool-call format a chat template speaks."""
    if "<tool_call>" in template:
        return HERMES
    if "<|python_start|>" in template:
        return LLAMA4
    if "[func_name1(" in template or "[func_name(" in template:
        return PYTHONIC
    if "<|python_tag|>" in template or ("tools" in template and '"parameters"' in template):
        return LLAMA3
    if re.search(r"\btools\b", template):
        return GENERIC
    return JSON


# --- what goes into the template ---

def fallback_system_prompt(tools: list[dict]) -> str:
    """camelid's description of the tools for a template that has no tool syntax of its own."""
    lines = [
        "You can call tools. To call a tool, answer with only a JSON object, one per call, in the format "
        '{"name": <tool name>, "arguments": <object of argument names and values>}. Use a tool only when it helps.',
        "Tools:",
    ]
    for t in tools:
        f = t["function"]
        lines.append(json.dumps({"name": f["name"], "description": f.get("description", ""),
                                 "parameters": f.get("parameters", {})}, ensure_ascii=False))
    return "\n".join(lines)


def call_text(fmt: ToolFormat, name: str, arguments: dict) -> str:
    """A call written the way the format writes it (for a template that cannot render calls itself)."""
    return json.dumps({"name": name, fmt.key: arguments}, ensure_ascii=False)


# --- reading calls back ---

@dataclass
class Call:
    name: str
    arguments: str  # JSON text of the arguments object (as the model wrote it for JSON calls)
    complete: bool = True


@dataclass
class Scan:
    content: str  # settled content (everything before `stable`, minus calls), unstripped
    calls: list[Call] = field(default_factory=list)  # the last may be incomplete (arguments still coming)
    stable: int = 0  # text before this index is settled: a later scan may start here
    settled: int = 0  # how many of `calls` lie before `stable`


def _ws(text: str, i: int) -> int:
    n = 0
    while i < len(text) and text[i] in " \t\r\n" and n < MAX_WS:
        i, n = i + 1, n + 1
    return i


def _match(text: str, i: int, parts: list) -> tuple[str, int, list[str]]:
    """Match a sequence of parts at text[i:]: a str literal, None (optional whitespace) or a tuple of
    alternatives (captured). ("yes", end, captures) / ("more", ...) when text ends inside / ("no", ...)."""
    caps = []
    for part in parts:
        if part is None:
            i = _ws(text, i)
            if i == len(text):
                return "more", i, caps
            continue
        alts = (part,) if isinstance(part, str) else part
        rest = text[i:]
        hit = next((a for a in alts if rest.startswith(a)), None)
        if hit is None:
            if any(a.startswith(rest) for a in alts):
                return "more", len(text), caps
            return "no", i, caps
        if not isinstance(part, str):
            caps.append(hit)
        i += len(hit)
    return "yes", i, caps


def _json_opening(text: str, i: int, names: tuple[str, ...]) -> tuple[str, int, str]:
    """`{"name": "<tool>", "<key>": ` at i: (status, index of the arguments value, tool name)."""
    quoted = tuple(json.dumps(n, ensure_ascii=False) for n in names)
    status, end, caps = _match(text, i, ["{", None, '"name"', None, ":", None, quoted, None, ",", None,
                                         ('"parameters"', '"arguments"'), None, ":", None])
    # a tool name that is a prefix of another ("get" / "get_time"): the longer one wins
    if status == "yes" and caps:
        name = json.loads(caps[0])
        return status, end, name
    return status, end, ""


def _arguments(text: str, i: int, final: bool) -> tuple[str, int, bool]:
    """The arguments object at text[i:], read with the JSON automaton: (JSON text, end index, complete).
    A value that breaks off (or, at the end, is unfinished) is closed with the fewest bytes that make it valid."""
    from .serve.constrained import JsonConstraint, json_object_node

    c = JsonConstraint(json_object_node())
    state, run = c.state, 0
    j = i
    while j < len(text):
        out = c.try_bytes(text[j].encode(), state, run)
        if out is None:
            break
        state, run = out
        j += 1
        if state == ():
            return text[i:j], j, True
    if j < len(text) or final:  # broken off, or the output ended: close it
        return text[i:j] + c.completion(state).decode(), j, True
    return text[i:j], j, False


def _closing(text: str, i: int) -> int | None:
    """Index after the bracket that closes the one at text[i] (strings skipped), or None if not closed yet."""
    depth, quote, esc = 0, "", False
    for j in range(i, len(text)):
        ch = text[j]
        if quote:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _literal(node: ast.AST):
    value = ast.literal_eval(node)
    json.dumps(value)  # only JSON-able values
    return value


def _pythonic_calls(source: str, names: tuple[str, ...] | None) -> list[Call] | None:
    """`[f(a=1), g(b="x")]` (or `name.call(a=1)` when names is None) as calls, or None if it is not that."""
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    items = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for node in items:
        if not isinstance(node, ast.Call) or node.args:
            return None
        f = node.func
        if names is None:  # a built-in tool: brave_search.call(query="...")
            if not (isinstance(f, ast.Attribute) and f.attr == "call" and isinstance(f.value, ast.Name)):
                return None
            name = f.value.id
        else:
            if not isinstance(f, ast.Name) or f.id not in names:
                return None
            name = f.id
        try:
            args = {k.arg: _literal(k.value) for k in node.keywords if k.arg is not None}
        except (ValueError, TypeError, SyntaxError):
            return None
        calls.append(Call(name, json.dumps(args, ensure_ascii=False)))
    return calls or None


class _Unsettled(Exception):
    """The text ends where more of it could change what this part is; `calls` were found there already."""

    def __init__(self, calls: list[Call] | None = None) -> None:
        self.calls = calls or []


def scan(text: str, names: tuple[str, ...], fmt: ToolFormat, final: bool = True, start: int = 0) -> Scan:
    """Content and calls in `text[start:]`.

    With final=False the text is a prefix of the output and the result holds only what more text cannot
    change: `content` stops where a call may be starting, and calls found there are reported (the last may
    be incomplete, its arguments still coming). `stable` is where settled text ends and `settled` how many
    of the calls lie before it: a later scan of a longer text may start at `stable`.
    """
    out = Scan("", [], start)
    i = start
    opens = tuple(m for m, _ in fmt.markers)
    closes = dict(fmt.markers)
    names = tuple(sorted(names, key=len, reverse=True))
    hot = re.compile("[{\\[" + "".join(sorted({re.escape(m[0]) for m in opens})) + "]")
    while i < len(text):
        m = hot.search(text, i)
        j = len(text) if m is None else m.start()
        out.content += text[i:j]
        out.stable = i = j
        if m is None:
            break
        try:
            got = _call_at(text, j, names, opens, closes, final)
        except _Unsettled as e:
            out.calls += e.calls
            return out
        if got is None:  # not a call: this character is content
            out.content += text[j]
            out.stable = i = j + 1
            continue
        calls, end = got
        out.calls += calls
        out.settled = len(out.calls)
        out.stable = i = end
    return out


def _call_at(text: str, j: int, names, opens, closes, final: bool):
    """(calls, end) for what starts at text[j]; ([], end) for a marker with no call after it (the marker
    is dropped); None when text[j] starts no call. Raises _Unsettled when more text is needed to tell."""
    for marker in opens:
        if text.startswith(marker, j):
            k = _ws(text, j + len(marker))
            if k == len(text) and not final:
                raise _Unsettled
            body = _body_at(text, k, names, final, builtin=marker == "<|python_tag|>")
            if body is None:
                return [], k
            calls, end = body
            return calls, _close(text, end, closes[marker], final, calls)
        if marker.startswith(text[j:]) and not final:
            raise _Unsettled
    return _body_at(text, j, names, final, builtin=False)


def _close(text: str, i: int, closing: str | None, final: bool, calls: list[Call]) -> int:
    """Skip the closing marker (and whitespace before it) after calls, when there is one."""
    if closing is None:
        return i
    k = _ws(text, i)
    if text.startswith(closing, k):
        return k + len(closing)
    if closing.startswith(text[k:]) and not final:
        raise _Unsettled(calls)
    return i


def _more(final: bool, calls: list[Call] | None = None):
    """None at the end of the output; otherwise the decision waits for more text."""
    if final:
        return None
    raise _Unsettled(calls)


def _body_at(text: str, j: int, names, final: bool, builtin: bool):
    """JSON call(s), a JSON list of calls, a pythonic list or (after <|python_tag|>) a built-in call at j:
    (calls, end), or None."""
    if j >= len(text):
        return None
    if text[j] == "{":
        return _json_calls(text, j, names, final, in_list=False)
    if text[j] == "[":
        k = _ws(text, j + 1)
        if k == len(text):
            return _more(final)
        if text[k] == "{":
            return _json_calls(text, k, names, final, in_list=True)
        status, _, _ = _match(text, k, [names, None, "("])
        if status != "yes":
            return None if status == "no" else _more(final)
        end = _closing(text, j)
        if end is None:
            return _more(final)
        calls = _pythonic_calls(text[j:end], names)
        return None if calls is None else (calls, end)
    if builtin:
        word = re.match(r"[A-Za-z_]\w*", text[j:])
        if word is None:
            return None
        status, _, _ = _match(text, j, [word.group(0) + ".call("])
        if status != "yes":
            return None if status == "no" else _more(final)
        end = _closing(text, text.index("(", j))
        if end is None:
            return _more(final)
        calls = _pythonic_calls(text[j:end], None)
        return None if calls is None else (calls, end)
    return None


def _json_calls(text: str, j: int, names, final: bool, in_list: bool):
    """One JSON call at j, or (in_list) calls separated by commas up to `]`: (calls, end) or None."""
    calls: list[Call] = []
    i = end = j
    while True:
        status, k, name = _json_opening(text, i, names)
        if status != "yes":
            if status == "more" and not final:
                raise _Unsettled(calls)
            return (calls, end) if calls else None
        args, end, complete = _arguments(text, k, final)
        calls.append(Call(name, args, complete))
        if not complete:
            raise _Unsettled(calls)
        e = _ws(text, end)
        if e == len(text):
            return _more(final, calls) or (calls, end)
        if text[e] == "}":
            end = e + 1
        if not in_list:
            return calls, end
        e = _ws(text, end)
        if e == len(text):
            return _more(final, calls) or (calls, end)
        if text[e] == "]":
            return calls, e + 1
        if text[e] != ",":
            return calls, end
        i = _ws(text, e + 1)
        if i == len(text):
            return _more(final, calls) or (calls, end)


@dataclass
class CallDelta:
    index: int
    name: str | None  # set once, on a call's first delta
    arguments: str  # the next piece of the arguments' JSON text


class ToolStream:
    """Reads an output piece by piece: content pieces and call deltas as soon as they are settled.

    The pieces join to exactly what `parse` gives for the whole output (tested at every split)."""

    def __init__(self, names: tuple[str, ...], fmt: ToolFormat) -> None:
        self.names, self.fmt = tuple(names), fmt
        self.text = ""
        self.base, self.base_content, self.base_calls = 0, "", []
        self.sent_content = 0  # characters of the stripped content sent
        self.sent_calls: list[int] = []  # characters of each call's arguments sent
        self.content, self.calls = "", []

    def _update(self, final: bool) -> tuple[str, list[CallDelta]]:
        s = scan(self.text, self.names, self.fmt, final=final, start=self.base)
        content = self.base_content + s.content
        calls = self.base_calls + s.calls
        # everything scanned up to s.stable is settled: the next scan starts there
        self.base, self.base_content = s.stable, content
        self.base_calls = self.base_calls + s.calls[: s.settled]
        self.content, self.calls = content, calls
        shown = content.strip()  # trailing whitespace is held: it may turn out to end the content
        piece = shown[self.sent_content:]
        self.sent_content = len(shown)
        deltas = []
        for n, call in enumerate(calls):
            if n == len(self.sent_calls):
                self.sent_calls.append(0)
                deltas.append(CallDelta(n, call.name, ""))
            more = call.arguments[self.sent_calls[n]:]
            if more:
                deltas.append(CallDelta(n, None, more))
                self.sent_calls[n] = len(call.arguments)
        return piece, deltas

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        """A new piece of output -> (content piece, call deltas), both possibly empty."""
        if not text:
            return "", []
        self.text += text
        return self._update(final=False)

    def finish(self) -> tuple[str, list[CallDelta]]:
        """The output is over: whatever was held back."""
        return self._update(final=True)


def parse(text: str, names: tuple[str, ...], fmt: ToolFormat) -> tuple[str | None, list[Call]]:
    """(content, calls) of a whole output. content is None when it is empty and there are calls."""
    s = scan(text, names, fmt, final=True)
    content = s.content.strip()
    return (content if content or not s.calls else None), s.calls
