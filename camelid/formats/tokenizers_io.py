"""Tokenizer files as they come with model folders, read into camelid's Tokenizer.

- Hugging Face `tokenizer.json` (byte-level BPE, or a SentencePiece vocabulary converted to BPE with
  byte fallback), with `tokenizer_config.json` and `generation_config.json` beside it;
- SentencePiece `tokenizer.model` (Llama 1/2, Meta's downloads and older HF folders);
- tiktoken rank files (Meta's Llama 3 `tokenizer.model`: one base64 token and its rank per line).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from ..errors import FormatError, first_line
from ..tokenizer import (
    END_OF_TURN_NAMES,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    Tokenizer,
    build_spm,
    byte_decoder,
    byte_level_pre_tokenizer,
)

# Meta's Llama 3.1 special tokens, ids 128000.. in this order (Llama 3.0 had reserved names at 128004,
# 128005, 128008 and 128010; the ids of the chat-format tokens are the same)
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)
LLAMA3_NUM_SPECIALS = 256


def llama3_special_tokens() -> list[str]:
    """The 256 special-token names Meta's Llama 3 tokenizer appends after the BPE ranks."""
    n_reserved = LLAMA3_NUM_SPECIALS - len(LLAMA3_NAMED_SPECIALS)
    return [*LLAMA3_NAMED_SPECIALS, *(f"<|reserved_special_token_{3 + i}|>" for i in range(n_reserved))]


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a FormatError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


# --- Hugging Face tokenizer.json ---


def _nodes(node, type_name: str) -> list[dict]:
    """Every component of a tokenizer.json section (nested Sequences included) of one type."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == type_name:
            found.append(node)
        for value in node.values():
            found += _nodes(value, type_name)
    elif isinstance(node, list):
        for value in node:
            found += _nodes(value, type_name)
    return found


def _token_name(value) -> str | None:
    """tokenizer_config's bos_token / eos_token: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    """generation_config's eos_token_id: an int or a list of ints."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _template_bos(spec: dict) -> str | None:
    """The token the post-processor puts first in a single sequence, if any (its BOS rule)."""
    for proc in _nodes(spec.get("post_processor"), "TemplateProcessing"):
        single = proc.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def chat_template_of(folder: Path, tokenizer_config: dict) -> str | None:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json").get("chat_template", template)
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def from_tokenizer_json(path: Path, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                        chat_template: str | None = None, min_vocab: int = 0) -> Tokenizer:
    """A Tokenizer from a Hugging Face tokenizer.json (+ the folder's tokenizer and generation configs)."""
    tokenizer_config, generation_config = tokenizer_config or {}, generation_config or {}
    spec = read_json(path)
    try:
        backend = HFTokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust library raises plain Exceptions
        raise FormatError(f"{path}: not a tokenizer the tokenizers library reads ({first_line(e)})") from None
    added = {t["id"]: t for t in spec.get("added_tokens", []) if isinstance(t, dict) and "id" in t}
    special = {i for i, t in added.items() if t.get("special")}
    byte_level = bool(_nodes(spec.get("decoder"), "ByteLevel"))
    table = byte_decoder()
    token_bytes = []
    for i in range(max(backend.get_vocab_size(with_added_tokens=True), min_vocab)):
        tok = backend.id_to_token(i)
        if tok is None:
            token_bytes.append(b"")
        elif i in added:
            token_bytes.append(tok.encode())
        elif byte_level:
            token_bytes.append(bytes(table[c] for c in tok) if all(c in table for c in tok) else tok.encode())
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            token_bytes.append(bytes([int(tok[3:5], 16)]))
        else:
            token_bytes.append(tok.replace("▁", " ").encode())

    def id_of(name: str | None) -> int | None:
        return backend.token_to_id(name) if name is not None else None

    template_bos = _template_bos(spec)
    bos_id = id_of(_token_name(tokenizer_config.get("bos_token")) or template_bos)
    if bos_id is None:
        bos_id = next(iter(_ids(generation_config.get("bos_token_id"))), None)
    eos_id = id_of(_token_name(tokenizer_config.get("eos_token")))
    eos_ids = _ids(generation_config.get("eos_token_id"))
    if eos_id is None and eos_ids:
        eos_id = eos_ids[0]
    add_bos = tokenizer_config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # no explicit rule: the post-processor's template decides
        add_bos = template_bos is not None
    stops = set(eos_ids) | {i for i in special if backend.id_to_token(i) in END_OF_TURN_NAMES}
    # SentencePiece-style decoders drop the "▁" prepended to the first word
    metaspace = [d for d in _nodes(spec.get("decoder"), "Metaspace") if d.get("prepend_scheme", "always") != "never"]
    strip = not byte_level and bool(_nodes(spec.get("decoder"), "Strip") or metaspace)
    return Tokenizer(backend, token_bytes, special, bos_id, eos_id, add_bos, stops, chat_template,
                     strip_leading_space=strip, kind="bpe" if byte_level else "spm")


# --- SentencePiece tokenizer.model ---


def is_tiktoken_file(path: Path) -> bool:
    """True for a tiktoken rank file (text lines "base64 rank"), False for a SentencePiece model."""
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n", 1)[0]
    parts = head.split()
    return len(parts) == 2 and parts[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/]+=*", parts[0]) is not None


def from_sentencepiece(path: Path, chat_template: str | None = None, extra_stop_ids: Iterable[int] = ()) -> Tokenizer:
    """A Tokenizer from a SentencePiece model file (Llama 1/2's tokenizer.model)."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        reason = first_line(e)
        raise FormatError(f"{path}: not a SentencePiece model ({reason})") from None
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [
        TOKEN_CONTROL if sp.is_control(i) else TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_BYTE if sp.is_byte(i)
        else TOKEN_UNUSED if sp.is_unused(i) else TOKEN_NORMAL
        for i in range(n)
    ]
    pieces = sp.encode("a", out_type=str)
    add_space_prefix = bool(pieces) and pieces[0].startswith("▁")
    optional = lambda i: i if i >= 0 else None  # sentencepiece says -1 for "none"
    return build_spm(tokens, scores, types, optional(sp.bos_id()), optional(sp.eos_id()), optional(sp.unk_id()),
                     add_bos=True, add_space_prefix=add_space_prefix, extra_stop_ids=extra_stop_ids,
                     chat_template=chat_template)


# --- tiktoken rank files (Meta's Llama 3 tokenizer.model) ---


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken file; ranks must be 0..n-1."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise FormatError(f"{path}: line {n} is not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise FormatError(f"{path}: ranks are not the numbers 0..{len(ranks) - 1}, each once")
    return ranks


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The last merge that makes `token`: run byte-level BPE on it using only merges ranked below it."""
    limit = ranks[token]
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if ranks.get(token[:i], limit) < limit and ranks.get(token[i:], limit) < limit]
    if len(splits) == 1:  # the usual case: only one way to make it from two lower-ranked tokens
        return splits[0]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise FormatError(f"tiktoken token {token!r} cannot be built from lower-ranked tokens")
    return parts[0], parts[1]


def from_tiktoken(path: Path, special_tokens: list[str] | None = None, chat_template: str | None = None) -> Tokenizer:
    """A byte-level BPE Tokenizer from a tiktoken rank file, with Llama 3's pre-tokenizer and special tokens.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank; the equivalent BPE merge
    list orders, for each multi-byte token by rank, the pair it is last merged from.
    """
    ranks = read_tiktoken_ranks(path)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    to_char = {b: c for c, b in byte_decoder().items()}
    text = {b: "".join(to_char[x] for x in b) for b in by_rank}
    vocab = {text[b]: r for b, r in ranks.items()}
    merges = []
    for b in by_rank:
        if len(b) > 1:
            left, right = _merge_of(ranks, b)
            merges.append((text[left], text[right]))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = byte_level_pre_tokenizer("llama3")
    backend.decoder = decoders.ByteLevel()
    names = special_tokens if special_tokens is not None else llama3_special_tokens()
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    base = len(ranks)
    if names and backend.token_to_id(names[0]) != base:
        raise FormatError(f"{path}: special tokens do not follow the {base} ranked tokens")
    special = set(range(base, base + len(names)))
    token_bytes = by_rank + [name.encode() for name in names]
    ids = {name: base + i for i, name in enumerate(names)}
    stops = [ids[n] for n in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>") if n in ids]
    return Tokenizer(backend, token_bytes, special, ids.get("<|begin_of_text|>"), ids.get("<|end_of_text|>"),
                     add_bos="<|begin_of_text|>" in ids, stop_ids=stops, chat_template=chat_template, kind="bpe")
