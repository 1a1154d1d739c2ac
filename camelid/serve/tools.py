"""Tool calling, a stage of the chat pipeline: the request's `tools` in, calls valid by construction out.

  parse_request    `tools`, `tool_choice`, `parallel_tool_calls` checked (a 400 naming the field otherwise)
  prepare          the conversation as the model's template takes it: tools in its `tools` variable (or
                   camelid's system message for a template without tool syntax), earlier calls' arguments
                   as objects (never a JSON string encoded again), tool results in the `tool` role
  ToolConstraint   what the engine may generate: free text until the output commits to a call (the
                   format's marker then `{`, or a complete `{"name": "<a given tool>"` prefix), then only a
                   call whose arguments match that tool's `parameters` schema; from the first token for
                   `required` and a named tool
  ChatOutput       one choice's text -> `content` and `tool_calls` (streamed as `delta.tool_calls` by index)

The formats themselves (what a template writes and how calls read back) are in camelid/toolformats.py.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from .. import toolformats as tf
from .constrained import JsonConstraint, Node, SchemaError, compile_schema, json_object_node
from .params import ApiError

TAIL = 256  # bytes of free text kept to spot a call's opening
# camelid's own format gives tool results back as a user turn, ending with this
AFTER_RESULTS = "\nAnswer the question with it in plain words, or call another tool if one is needed."


@dataclass
class ToolRequest:
    tools: list[dict]  # as the client sent them ({"type": "function", "function": {...}})
    names: tuple[str, ...]
    schemas: dict[str, dict]  # name -> parameters schema (an object schema)
    choice: str  # "auto" | "none" | "required" | "named"
    named: str | None
    parallel: bool
    fmt: tf.ToolFormat


def _simplify(schema):
    """Pydantic's Optional[X] (`anyOf: [{"type": X}, {"type": "null"}]`, as LangChain and LlamaIndex send it) as the
    type list the schema engine takes; other schemas unchanged (the engine refuses what it cannot do)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "items" in schema:
        out["items"] = _simplify(schema["items"])
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _simplify(v) for k, v in schema["properties"].items()}
    branches = schema.get("anyOf")
    simple = {"type", "title", "description"}
    if isinstance(branches, list) and branches and all(
            isinstance(b, dict) and isinstance(b.get("type"), str) and set(b) <= simple for b in branches):
        out.pop("anyOf")
        out["type"] = [b["type"] for b in branches]
    return out


def _function(t, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
        raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools", "invalid_value")
    f = t["function"]
    name = f.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise ApiError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'", "tools",
                       "invalid_value")
    params = f.get("parameters")
    if params is None or params == {}:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ApiError(400, f"{where}.function.parameters must be a JSON schema object", "tools", "invalid_type")
    params = _simplify(params)
    if "type" not in params:
        params = {**params, "type": "object"}
    if params.get("type") != "object":
        raise ApiError(400, f"{where}.function.parameters must describe an object (\"type\": \"object\")", "tools",
                       "invalid_value")
    try:
        compile_schema(params, f"{where}.function.parameters")
    except SchemaError as e:
        raise ApiError(400, f"tools: {e}", "tools", "unsupported_schema") from None
    return {"name": name, "parameters": params}


def parse_request(body: dict, template: str) -> ToolRequest | None:
    """The request's tool options, or None when it gives no tools. 400s for every mistake."""
    for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
        if body.get(old) is not None:
            raise ApiError(400, f"'{old}' is the deprecated form of '{new}': send '{new}' instead", old,
                           "unsupported_parameter")
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise ApiError(400, "'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of tools", "tools", "invalid_type")
    funcs = [_function(t, i) for i, t in enumerate(tools)]
    names = tuple(f["name"] for f in funcs)
    if len(set(names)) != len(names):
        raise ApiError(400, "tool names must be unique", "tools", "invalid_value")
    named = None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ApiError(400, "'tool_choice' must be auto, none, required or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice", "invalid_value")
        if name not in names:
            raise ApiError(400, f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice",
                           "invalid_value")
        choice, named = "named", name
    elif choice not in ("auto", "none", "required"):
        raise ApiError(400, f"'tool_choice' must be auto, none, required or a named function, got {choice!r}",
                       "tool_choice", "invalid_value")
    return ToolRequest(list(tools), names, {f["name"]: f["parameters"] for f in funcs}, choice, named, parallel,
                       tf.detect(template))


# --- the conversation as the template takes it ---

def _arguments_object(args, where: str) -> dict:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ApiError(400, f"{where}.function.arguments is not valid JSON: {e}", "messages", "invalid_value") from None
    if not isinstance(args, dict):
        raise ApiError(400, f"{where}.function.arguments must be a JSON object", "messages", "invalid_value")
    return args


def prepare(messages: list[dict], template: str, req: ToolRequest | None) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for a conversation that may hold tools, calls and results."""
    fmt = req.fmt if req is not None else tf.detect(template)
    out: list[dict] = []
    names_by_id: dict[str, str] = {}
    for i, m in enumerate(messages):
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if m["role"] == "assistant" and calls:
            if not isinstance(calls, list):
                raise ApiError(400, f"messages[{i}].tool_calls must be a list", "messages", "invalid_type")
            norm = []
            for k, c in enumerate(calls):
                where = f"messages[{i}].tool_calls[{k}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ApiError(400, f"{where} needs a function with a name", "messages", "invalid_value")
                call = {"id": c.get("id") or f"call_{i}_{k}", "type": "function",
                        "function": {"name": fn["name"], "arguments": _arguments_object(fn.get("arguments"), where)}}
                names_by_id[call["id"]] = fn["name"]
                norm.append(call)
            if fmt.native:
                m["tool_calls"] = norm
                m["content"] = m.get("content") or ""
            else:  # camelid's own format: the calls as the model is told to write them
                text = "\n".join(tf.call_text(fmt, c["function"]["name"], c["function"]["arguments"]) for c in norm)
                m["content"] = ((m.get("content") or "") + "\n" + text).strip()
        if m["role"] == "tool" and not fmt.native:  # results as a user turn the model can read
            name = m.get("name") or names_by_id.get(m.get("tool_call_id", ""), "the tool")
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            line = f"The tool {name} returned: {content if isinstance(content, str) else json.dumps(content)}"
            if out and out[-1].get("_results"):
                out[-1]["content"] = out[-1]["content"].removesuffix(AFTER_RESULTS) + "\n" + line + AFTER_RESULTS
                continue
            m = {"role": "user", "content": line + AFTER_RESULTS, "_results": True}
        out.append(m)
    for m in out:
        m.pop("_results", None)
    extra: dict = {}
    if req is not None and req.choice != "none":
        if fmt.native:
            extra["tools"] = req.tools
        else:
            prompt = tf.fallback_system_prompt(req.tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
            else:
                out.insert(0, {"role": "system", "content": prompt})
    return out, extra


# --- what the engine may generate ---

class ToolConstraint:
    """A lazy grammar over the output bytes, in the interface the engine's constrained decoding uses.

    State (immutable): (mode, tail, inner state, inner whitespace run, call bytes, calls made) with mode
    "free" (any text; `tail` holds its end), "pick" (inside a call's opening, tool name not yet chosen) or
    "call" (inside one tool's call); () when no more output may follow.
    """

    def __init__(self, req: ToolRequest) -> None:
        self.req = req
        key = req.fmt.key
        self.key = key
        self.nodes: dict[str, Node] = {
            n: compile_schema({"type": "object", "properties": {"name": {"const": n}, key: s}, "required": ["name", key]})
            for n, s in req.schemas.items()}
        self.pick_node = compile_schema({"type": "object", "properties": {"name": {"enum": list(req.names)},
                                                                          key: {"type": "object"}},
                                         "required": ["name", key]})
        alts = b"|".join(re.escape(json.dumps(n, ensure_ascii=False).encode()) for n in
                         sorted(req.names, key=len, reverse=True))
        self.opening = re.compile(rb'\{\s{0,16}"name"\s{0,16}:\s{0,16}(' + alts + rb")\Z")
        self.named_opening = re.compile(rb'\A\s{0,16}\{\s{0,16}"name"\s{0,16}:\s{0,16}(' + alts + rb")")
        markers = [re.escape(m.encode()) for m, _ in req.fmt.markers]
        self.marker = re.compile(b"(?:" + b"|".join(markers) + rb")\s{0,16}\{\Z") if markers else None
        if req.choice == "named":
            self.state = ("call", b"", (("V", self.nodes[req.named]),), 0, b"", 0, req.named)
        elif req.choice == "required":
            self.state = ("pick", b"", (("V", self.pick_node),), 0, b"", 0, "")
        else:
            self.state = ("free", b"", None, 0, b"", 0, "")

    # the engine's interface
    @property
    def free(self) -> bool:
        """Any token (special ones included) may come next."""
        return self.state == () or self.state[0] == "free"

    @property
    def done(self) -> bool:
        return self.state == ()

    def can_end(self, state: tuple | None = None) -> bool:
        s = self.state if state is None else state
        return s == () or s[0] == "free"

    def advance(self, data: bytes) -> None:
        out = self.try_bytes(data)
        if out is None:
            raise ValueError("bytes not allowed by the tool-call grammar")
        self.state = out[0]

    def completion(self, state: tuple | None = None) -> bytes:
        """The fewest bytes that finish the call being written (nothing outside a call)."""
        s = self.state if state is None else state
        if s == () or s[0] == "free":
            return b""
        mode, _, inner, _, call, _, _ = s
        rest = _J.completion(inner)
        if mode == "call":
            return rest
        # still picking the tool: the shortest way to a tool's name, then the fewest bytes of its call
        for k in range(len(rest)):
            if rest[k] == 0x22 and self.named_opening.match(call + rest[: k + 1]):
                sub = self._enter_call(call + rest[: k + 1])
                return rest[: k + 1] + _J.completion(sub[0])
        return rest

    def try_bytes(self, data: bytes, state: tuple | None = None, ws_run: int | None = None) -> tuple[tuple, int] | None:
        s = self.state if state is None else state
        for b in data:
            if s == ():
                return None
            s = self._byte(s, b)
            if s is None:
                return None
        return s, 0

    # the grammar
    def _enter_call(self, call: bytes) -> tuple | None:
        """(inner state, run) of a named call's constraint after its opening bytes, or None."""
        m = self.named_opening.match(call)
        if m is None:
            return None
        c = JsonConstraint(self.nodes[json.loads(m.group(1))])
        return c.try_bytes(call)

    def _after_call(self, made: int) -> tuple:
        if not self.req.parallel or self.req.choice == "named":
            return ()
        return ("free", b"", None, 0, b"", made, "")

    def _byte(self, s: tuple, b: int) -> tuple | None:
        mode, tail, inner, run, call, made, name = s
        if mode == "free":
            tail = (tail + bytes([b]))[-TAIL:]
            if b == 0x22:
                m = self.opening.search(tail)
                if m:
                    got = self._enter_call(m.group(0))
                    return None if got is None else ("call", b"", got[0], got[1], m.group(0), made, "")
            if b == 0x7B and self.marker is not None and self.marker.search(tail):
                got = JsonConstraint(self.pick_node).try_bytes(b"{")
                return ("pick", b"", got[0], got[1], b"{", made, "")
            return ("free", tail, None, 0, b"", made, "")
        got = _J.try_bytes(bytes([b]), inner, run)
        if got is None:
            return None
        call += bytes([b])
        if mode == "pick":
            if b == 0x22 and self.named_opening.match(call):  # the tool's name is written: its own grammar now
                sub = self._enter_call(call)
                if sub is None:
                    return None
                return ("call", b"", sub[0], sub[1], call, made, "")
            return ("pick", b"", got[0], got[1], call, made, "")
        if got[0] == ():
            return self._after_call(made + 1)
        return ("call", b"", got[0], got[1], call, made, name)


_J = JsonConstraint(json_object_node())  # its methods step any automaton state given to them


def check_fits(req: ToolRequest | None, params, max_tokens: int, tokens_for) -> None:
    """400 when tools cannot be honoured with the rest of the request."""
    if req is None or req.choice == "none":
        return
    if params.schema is not None:
        raise ApiError(400, "'response_format' and 'tools' cannot be used together; the tools' schemas already "
                            "constrain the calls", "response_format", "invalid_value")
    if req.choice in ("required", "named"):
        need = len(tokens_for(ToolConstraint(req).completion()))
        if need > max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is too small for the shortest call the tools allow ({need} "
                                "tokens)", "max_tokens", "invalid_value")


def constraint_for(req: ToolRequest | None) -> ToolConstraint | None:
    if req is None or req.choice == "none":
        return None
    return ToolConstraint(req)


# --- one choice's message ---

class ChatOutput:
    """One choice's chat message as its text arrives: `content`, and `tool_calls` when tools are on."""

    def __init__(self, req: ToolRequest | None, markers: dict[int, str]) -> None:
        self.parsing = req is not None and req.choice != "none"
        self.stream = tf.ToolStream(req.names, req.fmt) if self.parsing else None
        self.markers = markers  # special token id -> marker text the format reads
        self.text = []
        self.ids: list[str] = []
        self.names: list[str] = []
        self.closed = False

    def _delta(self, piece: str, calls: list[tf.CallDelta]) -> dict:
        delta: dict = {}
        if piece:
            delta["content"] = piece
        merged: dict[int, dict] = {}
        for d in calls:
            entry = merged.get(d.index)
            if entry is None:
                entry = merged[d.index] = {"index": d.index}
                if d.name is not None:
                    self.ids.append("call_" + secrets.token_hex(12))
                    self.names.append(d.name)
                    entry.update(id=self.ids[d.index], type="function", function={"name": d.name, "arguments": ""})
                else:
                    entry["function"] = {"arguments": ""}
            entry["function"]["arguments"] += d.arguments
        if merged:
            delta["tool_calls"] = list(merged.values())
        return delta

    def add(self, text: str, token_id: int | None) -> dict:
        """The delta for a new piece of text (and the token it came with)."""
        if not self.parsing:
            self.text.append(text)
            return {"content": text} if text else {}
        marker = self.markers.get(token_id) if token_id is not None else None
        return self._delta(*self.stream.feed(text + (marker or "")))

    def finish(self) -> dict:
        """The delta for whatever was held back once the choice is over."""
        self.closed = True
        if not self.parsing:
            return {}
        return self._delta(*self.stream.finish())

    @property
    def calls(self) -> list[dict]:
        if not self.parsing:
            return []
        return [{"id": self.ids[i], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(self.stream.calls)]

    def message(self) -> dict:
        if not self.parsing:
            return {"role": "assistant", "content": "".join(self.text)}
        content = self.stream.content.strip()
        msg: dict = {"role": "assistant", "content": content or (None if self.stream.calls else "")}
        if self.stream.calls:
            msg["tool_calls"] = self.calls
        return msg

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.parsing and self.stream.calls and reason == "stop" else reason


def marker_ids(tokenizer, req: ToolRequest | None) -> dict[int, str]:
    """Special tokens that are markers of the request's format (they are text the parser must see)."""
    if req is None:
        return {}
    wanted = {m for pair in req.fmt.markers for m in pair if m}
    return {i: tokenizer.backend.id_to_token(i) for i in tokenizer.special_ids
            if tokenizer.backend.id_to_token(i) in wanted}
