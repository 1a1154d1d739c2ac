"""The JSON automaton: every path it allows completes to JSON that parses and matches the schema."""

from __future__ import annotations

import json
import random

import pytest

from camelid.serve.constrained import JsonConstraint, SchemaError, compile_schema, json_object_node

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc"]}},
        "kind": {"enum": ["cat", 1, 10, None]},
        "pet": {"type": ["object", "null"], "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    },
    "required": ["name", "tags"],
}


def matches(value, schema) -> bool:
    """A small independent validator for the supported subset."""
    if "enum" in schema:
        return value in schema["enum"] and type(value) in {type(v) for v in schema["enum"]}
    types = schema.get("type", ["object", "array", "string", "number", "integer", "boolean", "null"])
    types = [types] if isinstance(types, str) else types
    checks = {
        "object": lambda v: isinstance(v, dict) and set(schema.get("required", [])) <= set(v)
        and ("properties" not in schema or set(v) <= set(schema["properties"]))
        and all(matches(x, schema.get("properties", {}).get(k, {})) for k, x in v.items()),
        "array": lambda v: isinstance(v, list) and all(matches(x, schema.get("items", {})) for x in v),
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    return any(checks[t](value) for t in types)


ALPHABET = [bytes([b]) for b in b'{}[]",:0123456789-+.eEtrufalsn \n\\abcxyz'] + [b'"name"', b'"tags"', b'"age"', b'"pet"',
                                                                             b'"kind"', b"true", b"null", b'"a"', b'"bc"']


def random_walk(c: JsonConstraint, rng: random.Random, steps: int) -> bytes:
    text = b""
    for _ in range(steps):
        options = [t for t in ALPHABET if c.try_bytes(t) is not None]
        if not options or c.done:
            break
        piece = rng.choice(options)
        c.advance(piece)
        text += piece
    return text


@pytest.mark.parametrize("schema", [None, PERSON, {"type": "array", "items": {"type": "number"}}, {}])
def test_every_allowed_path_completes_to_a_matching_value(schema):
    rng = random.Random(0)
    node = json_object_node() if schema is None else compile_schema(schema)
    for _ in range(150):
        c = JsonConstraint(node)
        text = random_walk(c, rng, rng.randint(0, 60))
        full = text + c.completion()
        value = json.loads(full)  # must parse
        if schema is None:
            assert isinstance(value, dict)
        else:
            assert matches(value, schema), full
        # the completion itself is allowed by the automaton and leaves it complete
        c2 = JsonConstraint(node)
        c2.advance(full)
        assert c2.can_end()


def test_rejects_what_the_schema_forbids():
    node = compile_schema(PERSON)
    for bad in [b"[", b'{"zzz"', b'{"name":1', b'{"name":"x"}', b'{"age":', b'{"name":"x","tags":["d"',
                b'{"name":"x","tags":[],"age":1.5', b'{"name":"x","tags":[]}x', b'{"name":"\x01']:
        c = JsonConstraint(node)
        assert c.try_bytes(bad) is None, bad
    ok = b'{"name": "Bo", "age": -12, "height": 1.5e3, "tags": ["a", "bc"], "kind": 10, "pet": null}'  # declared order
    c = JsonConstraint(node)
    c.advance(ok)
    assert c.done and matches(json.loads(ok), PERSON)


def test_number_literals_that_prefix_each_other():
    node = compile_schema({"enum": [1, 10, 100]})
    c = JsonConstraint(node)
    c.advance(b"1")
    assert c.can_end() and c.try_bytes(b"0") is not None and c.try_bytes(b"2") is None


def test_unsupported_schema_is_refused():
    for schema in [{"type": "object", "anyOf": []}, {"type": "strange"}, {"type": "object", "properties": {"a": {}},
                                                                          "required": ["b"]}, {"pattern": "x"}]:
        with pytest.raises(SchemaError):
            compile_schema(schema)
