"""Constrained decoding for `response_format`: JSON, or JSON matching a schema, guaranteed by construction.

A byte-level pushdown automaton follows the output as it is generated. Each candidate token is
checked by feeding its bytes to a copy of the automaton state (states are immutable tuples, so a
copy is free); a token the grammar cannot continue with is never chosen. The automaton also knows
the shortest text that completes the current value, so when the token budget is about to run out
the engine appends that text and the result still parses.

Schema subset: `type` (one name or a list of them) of object / array / string / number / integer /
boolean / null; `properties` with `required` (properties come out in their declared order, optional
ones may be left out, no others appear); `items`; `enum` and `const` (any JSON values). Other
keywords (`anyOf`, `pattern`, `minLength`, `additionalProperties`, `$ref` ...) are refused with a
SchemaError rather than silently ignored. An object without `properties` takes any keys, and a
schema of `{}` any JSON value.

State: a tuple of frames, innermost last. Frames:
  ("V", node)                   a value of schema node is expected (leading whitespace allowed)
  ("L", alts, n)                matching one of the literal byte strings alts; n bytes matched
  ("S", esc)                    inside a free string; esc: 0 none, 1 after backslash, 2-5 hex digits left + 1
  ("N", integer, phase)         a number; phase names where in the number grammar we are
  ("O", node, phase, last)      an object; last = index of the last property written (-1 none)
  ("A", node, phase, count)     an array
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import CamelidError

WS = b" \t\n\r"
MAX_WS = 16  # longest run of whitespace allowed between tokens of the JSON text
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
KNOWN = {"type", "properties", "required", "items", "enum", "const", "title", "description", "default",
         "additionalProperties", "$schema", "strict"}


class SchemaError(CamelidError, ValueError):
    """A JSON schema outside the supported subset."""


class Node:
    """A compiled schema: which value types are allowed, and for objects/arrays their parts."""

    __slots__ = ("types", "literals", "props", "required", "free_keys", "items")

    def __init__(self, types: tuple[str, ...], literals: tuple[bytes, ...] = (), props: tuple = (),
                 required: frozenset[str] = frozenset(), free_keys: bool = True, items: Node | None = None) -> None:
        self.types, self.literals, self.props = types, literals, props
        self.required, self.free_keys, self.items = required, free_keys, items


ANY = Node(TYPES)
ANY.items = ANY  # any value, whose arrays hold any values


def compile_schema(schema: Any, path: str = "schema") -> Node:
    """A Node for a JSON schema in the supported subset; SchemaError (one line) otherwise."""
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be an object")
    unknown = sorted(set(schema) - KNOWN)
    if unknown:
        raise SchemaError(f"{path}: unsupported schema keyword {unknown[0]!r} "
                          "(supported: type, properties, required, items, enum, const)")
    if schema.get("additionalProperties") not in (None, False) and "properties" in schema:
        raise SchemaError(f"{path}: additionalProperties with properties is not supported")
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path}.enum: must be a non-empty list")
        lits = tuple(sorted({json.dumps(v, ensure_ascii=False).encode() for v in values}))
        return Node((), literals=lits)
    types = schema.get("type", list(TYPES))
    types = tuple([types] if isinstance(types, str) else types)
    if not types or any(t not in TYPES for t in types):
        raise SchemaError(f"{path}.type: must be one of {', '.join(TYPES)} (or a list of them)")
    props: tuple = ()
    required: frozenset[str] = frozenset()
    free = True
    if "properties" in schema:
        if not isinstance(schema["properties"], dict):
            raise SchemaError(f"{path}.properties: must be an object")
        props = tuple((name, json.dumps(name, ensure_ascii=False).encode(), compile_schema(sub, f"{path}.properties.{name}"))
                      for name, sub in schema["properties"].items())
        free = False
    req = schema.get("required", [])
    if not isinstance(req, list) or any(not isinstance(r, str) for r in req):
        raise SchemaError(f"{path}.required: must be a list of property names")
    if not free and set(req) - {p[0] for p in props}:
        raise SchemaError(f"{path}.required: {sorted(set(req) - {p[0] for p in props})[0]!r} is not among the properties")
    required = frozenset(req)
    items = compile_schema(schema["items"], f"{path}.items") if "items" in schema else ANY
    if free and required:
        raise SchemaError(f"{path}.required: needs properties")
    return Node(types, props=props, required=required, free_keys=free, items=items)


def json_object_node() -> Node:
    """`response_format: {"type": "json_object"}`: any JSON object."""
    return Node(("object",), items=ANY)


# --- the automaton -----------------------------------------------------------------------------

_DIGITS = b"0123456789"
_HEX = b"0123456789abcdefABCDEF"
_ESC = b'"\\/bfnrtu'


def _value_starts(node: Node, b: int) -> tuple | None:
    """The frames that begin a value of `node` with byte b, or None."""
    if node.literals:
        alts = tuple(a for a in node.literals if a[0] == b)
        return (("L", alts, 1),) if alts else None
    t = node.types
    if b == 0x22 and "string" in t:
        return (("S", 0),)
    if b == 0x7B and "object" in t:
        return (("O", node, "open", -1),)
    if b == 0x5B and "array" in t:
        return (("A", node, "open", 0),)
    if (b == 0x2D or b in _DIGITS) and ("number" in t or "integer" in t):
        integer = "number" not in t
        return (("N", integer, "minus" if b == 0x2D else ("zero" if b == 0x30 else "int")),)
    lits = []
    if "boolean" in t:
        lits += [b"true", b"false"]
    if "null" in t:
        lits.append(b"null")
    alts = tuple(a for a in lits if a[0] == b)
    return (("L", alts, 1),) if alts else None


def _number_next(integer: bool, phase: str, b: int) -> str | None:
    digit = b in _DIGITS
    if phase == "minus":
        return "zero" if b == 0x30 else ("int" if digit else None)
    if phase in ("zero", "int"):
        if digit and phase == "int":
            return "int"
        if not integer and b == 0x2E:
            return "dot"
        if not integer and b in b"eE":
            return "e"
        return None
    if phase in ("dot", "frac"):
        if digit:
            return "frac"
        return "e" if phase == "frac" and b in b"eE" else None
    if phase == "e":
        return "esign" if b in b"+-" else ("exp" if digit else None)
    if phase in ("esign", "exp"):
        return "exp" if digit else None
    return None


_NUM_DONE = {"zero", "int", "frac", "exp"}


def _allowed_keys(node: Node, last: int) -> list[int]:
    """Indices of properties that may come next: in order, never skipping a required one."""
    out = []
    for i in range(last + 1, len(node.props)):
        out.append(i)
        if node.props[i][0] in node.required:
            break
    return out


def _may_close(node: Node, last: int) -> bool:
    return all(name not in node.required for name, _, _ in node.props[last + 1:])


def _complete(frame: tuple, stack: tuple) -> tuple | None:
    """Pop a finished frame and tell its parent a value ended; the new stack, or None."""
    if not stack:
        return ()
    parent = stack[-1]
    kind = parent[0]
    if kind == "O":
        _, node, phase, last = parent
        if phase == "key":  # the key is done; for a schema'd object, note which property it named
            if not node.free_keys:
                key = next(a for a in frame[1] if len(a) == frame[2])
                last = next(i for i, p in enumerate(node.props) if p[1] == key)
            return stack[:-1] + (("O", node, "colon", last),)
        return stack[:-1] + (("O", node, "after", last),)
    if kind == "A":
        _, node, _, count = parent
        return stack[:-1] + (("A", node, "after", count + 1),)
    return None


def feed_byte(state: tuple, b: int) -> tuple | None:
    """The state after byte b, or None when the grammar does not allow it."""
    if not state:
        return None  # the value is complete: nothing may follow
    top = state[-1]
    rest = state[:-1]
    kind = top[0]
    if kind == "V":
        if b in WS:
            return state
        start = _value_starts(top[1], b)
        return rest + start if start else None
    if kind == "L":
        _, alts, n = top
        nxt = tuple(a for a in alts if len(a) > n and a[n] == b)
        if nxt:
            return rest + (("L", nxt, n + 1),)
        if any(len(a) == n for a in alts):  # a literal ended before b: b belongs to the parent
            up = _complete(top, rest)
            return None if up is None else feed_byte(up, b)
        return None
    if kind == "S":
        esc = top[1]
        if esc == 0:
            if b == 0x22:
                return _complete(top, rest)
            if b == 0x5C:
                return rest + (("S", 1),)
            return None if b < 0x20 else state
        if esc == 1:
            if b not in _ESC:
                return None
            return rest + (("S", 5 if b == 0x75 else 0),)
        if b not in _HEX:
            return None
        return rest + (("S", 0 if esc == 2 else esc - 1),)
    if kind == "N":
        _, integer, phase = top
        nxt = _number_next(integer, phase, b)
        if nxt is not None:
            return rest + (("N", integer, nxt),)
        if phase in _NUM_DONE:
            up = _complete(top, rest)
            return None if up is None else feed_byte(up, b)
        return None
    if kind == "O":
        _, node, phase, last = top
        if b in WS and phase != "key":
            return state
        if phase in ("open", "comma"):
            if b == 0x7D and phase == "open" and _may_close(node, last):
                return _complete(top, rest)
            if node.free_keys:
                return rest + (("O", node, "key", last), ("S", 0)) if b == 0x22 else None
            keys = _allowed_keys(node, last)
            alts = tuple(node.props[i][1] for i in keys)
            return rest + (("O", node, "key", last), ("L", alts, 1)) if b == 0x22 and alts else None
        if phase == "colon":
            if b != 0x3A:
                return None
            value = ANY if node.free_keys else node.props[last][2]
            return rest + (("O", node, "value", last), ("V", value))
        if phase == "after":
            if b == 0x2C:
                if not node.free_keys and not _allowed_keys(node, last):
                    return None
                return rest + (("O", node, "comma", last),)
            if b == 0x7D and _may_close(node, last):
                return _complete(top, rest)
            return None
        return None
    if kind == "A":
        _, node, phase, count = top
        if b in WS:
            return state
        if phase == "open" and b == 0x5D:
            return _complete(top, rest)
        if phase in ("open", "comma"):
            start = _value_starts(node.items, b)
            return rest + (("A", node, "value", count),) + start if start else None
        if phase == "after":
            if b == 0x2C:
                return rest + (("A", node, "comma", count),)
            if b == 0x5D:
                return _complete(top, rest)
        return None
    return None


class JsonConstraint:
    """Tracks one output against a compiled schema. `state` is immutable; `advance` replaces it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.state: tuple = (("V", node),)
        self.ws_run = 0

    def try_bytes(self, data: bytes, state: tuple | None = None, ws_run: int | None = None) -> tuple[tuple, int] | None:
        """(new state, whitespace run) after data, or None if not allowed."""
        s = self.state if state is None else state
        run = self.ws_run if ws_run is None else ws_run
        if not data:
            return None
        for b in data:
            s = feed_byte(s, b)
            if s is None:
                return None
            if b in WS and not (s and s[-1][0] == "S"):  # whitespace between tokens of the JSON text
                run += 1
                if run > MAX_WS:
                    return None
            else:
                run = 0
        return s, run

    def advance(self, data: bytes) -> None:
        out = self.try_bytes(data)
        if out is None:
            raise ValueError("bytes not allowed by the grammar")
        self.state, self.ws_run = out

    @property
    def done(self) -> bool:
        """The value is complete and nothing more may follow."""
        return self.state == ()

    def can_end(self, state: tuple | None = None) -> bool:
        """The text so far is a complete value (a number may still go on, but need not)."""
        s = self.state if state is None else state
        while s:
            top = s[-1]
            if top[0] == "N" and top[2] in _NUM_DONE or top[0] == "L" and any(len(a) == top[2] for a in top[1]):
                s = _complete(top, s[:-1])
                if s is None:
                    return False
            else:
                return False
        return True

    def completion(self, state: tuple | None = None) -> bytes:
        """The shortest bytes that make the text so far a complete value."""
        return _completion(self.state if state is None else state)


def _min_value(node: Node) -> bytes:
    if node.literals:
        return min(node.literals, key=len)
    options = []
    for t in node.types:
        if t == "object":
            options.append(b"{" + _close_object(node, -1, True))
        elif t == "array":
            options.append(b"[]")
        elif t == "string":
            options.append(b'""')
        elif t in ("number", "integer"):
            options.append(b"0")
        elif t == "boolean":
            options.append(b"true")
        elif t == "null":
            options.append(b"null")
    return min(options, key=len)


def _close_object(node: Node, last: int, first: bool) -> bytes:
    """The required properties after `last` with minimal values, then '}'."""
    parts = [p[1] + b":" + _min_value(p[2]) for i, p in enumerate(node.props) if i > last and p[0] in node.required]
    body = b",".join(parts)
    return (b"," + body if body and not first else body) + b"}"


def _completion(state: tuple) -> bytes:
    """Close every open frame, innermost first, with the fewest bytes."""
    out = b""
    s = state
    while s:
        top, s = s[-1], s[:-1]
        kind = top[0]
        if kind == "V":
            out += _min_value(top[1])
        elif kind == "L":
            _, alts, n = top
            if not any(len(a) == n for a in alts):
                best = min(alts, key=len)
                out += best[n:]
                top = ("L", (best,), len(best))
        elif kind == "S":
            esc = top[1]
            out += (b"n" if esc == 1 else b"0" * max(esc - 1, 0)) + b'"'
        elif kind == "N":
            out += b"0" if top[2] in ("minus", "dot", "e", "esign") else b""
        elif kind == "O":
            _, node, phase, last = top
            if phase == "colon":  # a key was written: its value, then the rest
                out += b":" + (b"null" if node.free_keys else _min_value(node.props[last][2]))
            elif phase == "comma":  # a comma was written: one more property is owed
                if node.free_keys:
                    out += b'"":null'
                else:
                    last = _allowed_keys(node, last)[-1]
                    out += node.props[last][1] + b":" + _min_value(node.props[last][2])
            out += _close_object(node, last, phase == "open")
        elif kind == "A":
            _, node, phase, count = top
            if phase == "comma":
                out += _min_value(node.items)
            out += b"]"
        if s:
            s = _complete(top, s)
            if s is None:
                break
    return out
