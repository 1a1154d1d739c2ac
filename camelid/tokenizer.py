"""One Tokenizer interface over the `tokenizers` library, for byte-level BPE and SentencePiece vocabularies.

Encoding is done by `tokenizers`. Decoding is done here from a table of each token's bytes, so a
stream of ids turns into valid UTF-8 text piece by piece (a character split across tokens is held
back until it is complete). User text is encoded with special tokens treated as plain text unless
asked: typing `<|im_end|>` in a message cannot end a turn.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# names llama.cpp also treats as end of generation when a file does not list them
END_OF_TURN_NAMES = (
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|eot|>", "<|eom|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
    "<end_of_turn>", "</s>", "<|end▁of▁sentence|>",
)

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 4 (GGUF pre "llama4", llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O): the split regex of Llama 4's tokenizer.json,
# as llama.cpp's llama-vocab.cpp quotes it ("original regex from tokenizer.json")
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters of byte-level BPE back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer for a byte-level BPE vocabulary, by GGUF's `tokenizer.ggml.pre` name."""
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("llama4", "gpt-4o"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in ("default", "gpt-2", "gpt2", ""):
        print(f"camelid: warning: unknown pre-tokenizer {pre!r}; using GPT-2's rules", file=sys.stderr)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


class Tokenizer:
    """Text <-> token ids for one model.

    bos_id / eos_id: the model's declared tokens; add_bos: whether a sequence starts with BOS;
    stop_ids: every id that ends generation; special_ids: control tokens (never produced by encoding
    user text); chat_template: the model's own jinja template, or None.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        token_bytes: Sequence[bytes],
        special_ids: Iterable[int],
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        strip_leading_space: bool = False,
        kind: str = "bpe",
    ) -> None:
        self.backend = backend
        self.token_bytes = list(token_bytes)
        self.special_ids = frozenset(special_ids)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        stops = set(stop_ids)
        if eos_id is not None:
            stops.add(eos_id)
        self.stop_ids = frozenset(stops)
        self.chat_template = chat_template
        self.strip_leading_space = strip_leading_space  # SentencePiece's "▁" prefix at a sequence start
        self.kind = kind

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def token_text(self, token_id: int) -> str:
        """The text form of one token (special tokens by name)."""
        return self.backend.id_to_token(token_id) if token_id in self.special_ids else self.token_bytes[token_id].decode("utf-8", "replace")

    def encode(self, text: str, special: bool = False, bos: bool = False) -> list[int]:
        """Ids of `text`. special=True parses special-token names in it; bos=True prepends BOS when the model uses one."""
        self.backend.encode_special_tokens = not special
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        out = []
        for i in ids:
            if i in self.special_ids:
                if special:
                    out.append(self.backend.id_to_token(i).encode())
            else:
                out.append(self.token_bytes[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int], special: bool = False, start_of_sequence: bool = True) -> str:
        """Text of `ids`; special=True shows special tokens by name. Invalid UTF-8 becomes U+FFFD."""
        text = self.decode_bytes(ids, special).decode("utf-8", "replace")
        if start_of_sequence and self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def stream(self, special: bool = False) -> StreamDecoder:
        """A decoder that takes ids one at a time and returns only complete UTF-8 text."""
        return StreamDecoder(self, special)


class StreamDecoder:
    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id], self.special))

    def flush(self) -> str:
        """Whatever bytes are left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# --- builders from a vocabulary list (GGUF's tokenizer.ggml.* arrays, SentencePiece pieces) ---

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _end_of_turn_ids(tokens: Sequence[str], special_ids: Iterable[int], declared: Iterable[int | None]) -> set[int]:
    ids = {i for i in declared if i is not None}
    ids |= {i for i in special_ids if tokens[i] in END_OF_TURN_NAMES}
    return ids


def _add_special(backend: HFTokenizer, tokens: Sequence[str], types: Sequence[int]) -> set[int]:
    special = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    backend.add_tokens([
        AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False) for i in special
    ])
    return {i for i in special if types[i] == TOKEN_CONTROL}


def build_bpe(
    tokens: Sequence[str], merges: Sequence[str], types: Sequence[int] | None, pre: str,
    bos_id: int | None, eos_id: int | None, add_bos: bool, extra_stop_ids: Iterable[int | None] = (),
    chat_template: str | None = None,
) -> Tokenizer:
    """A byte-level BPE tokenizer (GGUF `gpt2` model) from its vocabulary and merges."""
    types = list(types) if types is not None else [TOKEN_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in ("llama-bpe", "llama3")))
    backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    special = _add_special(backend, tokens, types)
    table = byte_decoder()
    token_bytes = []
    for i, t in enumerate(tokens):
        if types[i] == TOKEN_USER_DEFINED or i in special:
            token_bytes.append(t.encode())
        else:
            token_bytes.append(bytes(table[c] for c in t) if all(c in table for c in t) else t.encode())
    stops = _end_of_turn_ids(tokens, special, [eos_id, *extra_stop_ids])
    return Tokenizer(backend, token_bytes, special, bos_id, eos_id, add_bos, stops, chat_template, kind="bpe")


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging: a pair (a, b) whose join is a
    normal token merges with the priority of that token's score (ties by lower id)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL}
    found = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                found.append((-scores[pid], pid, vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def build_spm(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], bos_id: int | None,
    eos_id: int | None, unk_id: int | None, add_bos: bool, add_space_prefix: bool = True,
    extra_stop_ids: Iterable[int | None] = (), chat_template: str | None = None,
) -> Tokenizer:
    """A SentencePiece-style (Llama 1/2 `llama` model) tokenizer: "▁" for spaces, byte fallback."""
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[unk_id] if unk_id is not None else None
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
    # spaces -> "▁", and (like llama.cpp and SentencePiece) one "▁" always prepended; Metaspace's
    # prepend_scheme="always" skips it when the text already starts with a space, losing that space
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = _add_special(backend, tokens, types)
    special |= {i for i, t in enumerate(types) if t in (TOKEN_UNKNOWN,)}
    token_bytes = []
    for i, t in enumerate(tokens):
        if types[i] == TOKEN_BYTE and len(t) == 6 and t.startswith("<0x"):
            token_bytes.append(bytes([int(t[3:5], 16)]))
        else:
            token_bytes.append(t.replace("▁", " ").encode())
    stops = _end_of_turn_ids(tokens, special, [eos_id, *extra_stop_ids])
    return Tokenizer(backend, token_bytes, special, bos_id, eos_id, add_bos, stops, chat_template,
                     strip_leading_space=add_space_prefix, kind="spm")
