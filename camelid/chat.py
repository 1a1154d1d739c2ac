"""Chat prompts: the model's own jinja template (sandboxed), or a built-in llama-2 / llama-3 / llama-4 / chatml one.

Encoding happens in token space where it matters: a special token's name typed inside a message is
encoded as plain text, so user text can never open or close a turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Literal, TypedDict

from .errors import CamelidError
from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "tool", "ipython"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2 = (  # Meta's format: the system prompt folded into the first user turn
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA4 = (  # Llama 4's turns: <|header_start|>role<|header_end|>\n\n content <|eot|>
    "{{ bos_token }}{% for message in messages %}{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n'"
    " + message['content'] + '<|eot|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}"
)
BUILTIN = {"chatml": CHATML, "llama-3": LLAMA3, "llama-4": LLAMA4, "llama-2": LLAMA2}


class TemplateError(CamelidError, ValueError):
    """A chat template that fails to render (or refuses the conversation)."""


def builtin_for(tokenizer: Tokenizer) -> str:
    """The built-in format that fits a vocabulary without a template of its own."""
    names = {tokenizer.backend.id_to_token(i) for i in tokenizer.special_ids}
    if "<|header_start|>" in names:
        return "llama-4"
    if "<|start_header_id|>" in names:
        return "llama-3"
    if "<|im_start|>" in names:
        return "chatml"
    return "llama-2"


def template_for(tokenizer: Tokenizer) -> tuple[str, str]:
    """(template source, where it came from) for a model."""
    if tokenizer.chat_template:
        return tokenizer.chat_template, "model"
    name = builtin_for(tokenizer)
    return BUILTIN[name], f"built-in {name}"


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    # as transformers renders it: keys in their order and no HTML escaping (jinja's own tojson does both),
    # so a tool's schema reads the same to the model here as in the template authors' tests
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e}") from None


def render(source: str, messages: Dialog, tokenizer: Tokenizer | None = None, add_generation_prompt: bool = True, **extra) -> str:
    """The prompt text a template makes of a conversation."""
    from jinja2 import TemplateError as JinjaError

    bos = tokenizer.backend.id_to_token(tokenizer.bos_id) if tokenizer and tokenizer.bos_id is not None else ""
    eos = tokenizer.backend.id_to_token(tokenizer.eos_id) if tokenizer and tokenizer.eos_id is not None else ""
    try:
        context = {"bos_token": bos, "eos_token": eos, **extra}
        return _compile(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
    except TemplateError:
        raise
    except (JinjaError, TypeError, KeyError, IndexError) as e:
        raise TemplateError(f"chat template failed: {e}") from None


def validate(messages: Dialog) -> list[Message]:
    """Messages as plain dicts of role and string content (OpenAI-style content parts are joined)."""
    out: list[Message] = []
    if not messages:
        raise TemplateError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise TemplateError(f"message {i} needs a 'role' and a 'content'")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise TemplateError(f"message {i}: only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str) or not isinstance(m["role"], str):
            raise TemplateError(f"message {i}: role and content must be strings")
        out.append({**m, "role": m["role"], "content": content})
    return out


_MARK = 0xF0000  # Unicode supplementary private use area: stands in for special-token names in user text


def encode_chat(tokenizer: Tokenizer, messages: Dialog, template: str | None = None,
                add_generation_prompt: bool = True, **extra) -> list[int]:
    """Prompt ids for a conversation. Special-token names inside message text stay plain text.
    `extra` are more template variables (`tools=[...]` for a template that renders tools)."""
    messages = validate(messages)
    source = template or template_for(tokenizer)[0]
    names = sorted({tokenizer.backend.id_to_token(i) for i in tokenizer.special_ids}, key=len, reverse=True)
    literal: dict[str, str] = {}

    def protect(text: str) -> str:
        for name in names:
            if name and name in text:
                mark = literal.setdefault(name, chr(_MARK + len(literal)))
                text = text.replace(name, mark)
        return text

    safe = [{**m, "content": protect(m["content"])} for m in messages]
    text = render(source, safe, tokenizer, add_generation_prompt, **extra)
    ids: list[int] = []
    if not literal:
        ids = tokenizer.encode(text, special=True)
    else:
        marks = {mark: name for name, mark in literal.items()}
        piece = []
        for ch in text + "\0end":
            if ch in marks or ch == "\0":
                ids += tokenizer.encode("".join(piece), special=True)
                piece = []
                if ch in marks:
                    ids += tokenizer.encode(marks[ch], special=False)
                else:
                    break
            else:
                piece.append(ch)
    if tokenizer.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    return ids
