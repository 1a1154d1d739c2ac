"""OpenAI request bodies -> checked generation parameters. Every mistake is an ApiError (a 4xx with an OpenAI-style body)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import SamplingError
from ..sampling import SamplingParams
from .constrained import Node, SchemaError, compile_schema, json_object_node


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """Server-side limits on what one request may ask."""

    max_seq_len: int  # slot length: prompt + output tokens
    max_tokens: int  # most new tokens one request may ask for
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    max_stop: int = 4
    max_top_logprobs: int = 20
    vocab_size: int | None = None  # token ids in logit_bias are checked against it
    speculate: str = "none"  # the server's --speculate for requests that do not say: "none", "ngram" or "draft"
    draft: str | None = None  # the name of the server's draft model (--speculate MODEL), when it has one


@dataclass
class GenParams:
    """What a completion request asks, once checked. Prompt ids are filled in by the caller."""

    max_tokens: int | None
    sampling: SamplingParams
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    schema: Node | None = None
    echo: bool = False
    cache_salt: str | None = None  # the prompt cache reuses only blocks made under the same salt
    speculate: str = "none"  # "ngram" (prompt lookup) or "draft" (the server's draft model); the output is unchanged


def _number(body: dict, name: str, default: float | None, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(value).__name__}", name,
                       "invalid_type")
    if isinstance(value, float) and not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {type(value).__name__}", name, "invalid_type")
    return value


def _stop(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > limits.max_stop:
        raise ApiError(400, f"'stop' takes at most {limits.max_stop} strings", "stop", "invalid_value")
    return [s for s in stop if s]


def _response_format(body: dict) -> Node | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise ApiError(400, "'response_format' must be an object with a 'type'", "response_format", "invalid_type")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_node()
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "'response_format.json_schema' must be an object with a 'schema' object",
                           "response_format", "invalid_type")
        try:
            return compile_schema(spec.get("schema", {}))
        except SchemaError as e:
            raise ApiError(400, f"response_format: {e}", "response_format", "unsupported_schema") from None
    raise ApiError(400, f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
                   "response_format", "invalid_value")


def _logit_bias(body: dict, limits: Limits) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias in [-100, 100]} as sorted (id, bias) pairs."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must be an object of token id -> bias", "logit_bias", "invalid_type")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.strip().isdigit()):
            raise ApiError(400, f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias", "invalid_value")
        tok = int(key)
        if limits.vocab_size is not None and tok >= limits.vocab_size:
            raise ApiError(400, f"'logit_bias' token id {tok} is not in [0, {limits.vocab_size})", "logit_bias",
                           "invalid_value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias",
                           "invalid_value")
        out.append((tok, float(value)))
    return tuple(sorted(out))


# Fields that would change the output but that this server does not do: refused by name rather than ignored.
# (Fields that only label a request, such as user, metadata, store or service_tier, are ignored.)
UNSUPPORTED = {
    "chat": ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity"),
    "completion": ("suffix", "tools", "tool_choice", "functions", "function_call", "response_format"),
}


def refuse_unsupported(body: dict, chat: bool) -> None:
    """A 400 naming the first field that changes the output and is not supported here."""
    for name in UNSUPPORTED["chat" if chat else "completion"]:
        if body.get(name) not in (None, "", [], {}):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    modalities = body.get("modalities")
    if chat and modalities is not None and modalities != ["text"]:
        raise ApiError(400, "'modalities' other than [\"text\"] are not supported by this server", "modalities",
                       "unsupported_parameter")
    best_of = body.get("best_of")
    if not chat and best_of not in (None, 1) and best_of != body.get("n", 1):
        raise ApiError(400, "'best_of' is not supported by this server (use n)", "best_of", "unsupported_parameter")


def parse_common(body: dict, limits: Limits, chat: bool) -> GenParams:
    """The sampling and output options shared by /v1/chat/completions and /v1/completions."""
    refuse_unsupported(body, chat)
    max_tokens = _number(body, "max_completion_tokens", None, 1, limits.max_tokens, integer=True) if chat else None
    echo = False if chat else _bool(body, "echo")
    if max_tokens is None:  # with echo, 0 scores the prompt alone (older lm-eval sends max_tokens 0)
        max_tokens = _number(body, "max_tokens", None, 0 if echo else 1, limits.max_tokens, integer=True)
    temperature = _number(body, "temperature", 1.0, 0, 2)
    try:
        sampling = SamplingParams(
            temperature=temperature,
            top_p=_number(body, "top_p", 1.0, 0, 1) or 1e-9,
            top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True),
            min_p=_number(body, "min_p", 0.0, 0, 1),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
            seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
            logit_bias=_logit_bias(body, limits),
        )
    except SamplingError as e:
        raise ApiError(400, str(e), None, "invalid_value") from None
    if chat:
        want = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, limits.max_top_logprobs, integer=True)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _number(body, "logprobs", None, 0, 5, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    return GenParams(
        max_tokens=max_tokens,
        sampling=sampling,
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        stop=_stop(body, limits),
        stream=_bool(body, "stream"),
        include_usage=_bool(stream_options, "include_usage"),
        logprobs=logprobs,
        schema=_response_format(body),
        echo=echo,
        cache_salt=_cache_salt(body),
        speculate=_speculate(body, limits),
    )


def _speculate(body: dict, limits: Limits) -> str:
    """'none', 'ngram', or 'draft' for a request's `speculate` ('ngram', 'none', or the draft model's name)."""
    value = body.get("speculate")
    if value is None:
        return limits.speculate
    if value in ("ngram", "none"):
        return value
    if limits.draft is not None and value in (limits.draft, "draft"):
        return "draft"
    offered = "'ngram', 'none'" + (f" or {limits.draft!r} (the draft model)" if limits.draft else "")
    hint = "" if limits.draft else " (a draft model needs the server started with --speculate MODEL)"
    raise ApiError(400, f"'speculate' must be {offered}, got {value!r}{hint}", "speculate", "invalid_value")


def _cache_salt(body: dict) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 1024):
        raise ApiError(400, "'cache_salt' must be a non-empty string of at most 1024 characters", "cache_salt",
                       "invalid_value")
    return salt


def messages_of(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages", "invalid_type")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool",
                           "messages", "invalid_value")
        content = m.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "messages", "invalid_type")
    # "developer" is the newer name of "system"
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def prompt_of(body: dict) -> str | list[int]:
    """A completion prompt: a string, a list of one string, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt", "invalid_type")


def check_fits(prompt_len: int, max_tokens: int | None, limits: Limits, param: str) -> int:
    """The max_tokens to run with; 400 when the prompt (plus what is asked) does not fit the context."""
    if prompt_len == 0:
        raise ApiError(400, "the prompt is empty", param, "invalid_value")
    room = limits.max_seq_len - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; this server's context is {limits.max_seq_len} tokens",
                       param, "context_length_exceeded")
    if max_tokens is None:
        return min(room, limits.max_tokens)
    if max_tokens > room:
        raise ApiError(400, f"the prompt is {prompt_len} tokens and {max_tokens} more were asked; this server's context "
                            f"is {limits.max_seq_len} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens
