"""A guard model: any Llama-family model prompted in Llama Guard 3 or 4's format, its verdict and its scores.

    guard = Guard.load("llama-guard-3-1b")             # camelid's own loader; version from the vocabulary
    v = guard.judge([{"role": "user", "content": "..."}], codes=("S1", "S9"))
    v.flagged, v.categories, v.p_unsafe, v.scores      # scores: per enabled category, from token probabilities

The prompt (render_prompt) is Meta's: the text of the Llama-Guard-3-8B chat template (tokenizer_config.json), the
same text Meta's reference guardrail (llama-stack's llama_guard provider) sends for Llama Guard 3 and 4, put in one
user turn of the guard's chat format (Llama 3 headers for version 3, Llama 4 headers for version 4), ending where the
model writes its answer (`safe`, or `unsafe` and a line of comma-separated codes). Two quirks of the 8B template's
wrapper are not copied: the space before `<|begin_of_text|>` and the missing blank line after the assistant header
(Meta's prompt-format pages and its chat format have neither); the text between the headers is byte for byte the
template's. Custom categories replace or extend S1-S14 as `CODE: NAME.` lines, a description on the lines after
(the format of the 1B/11B/4 templates' `categories` and of Meta's cookbook); a request checks only its key's codes.

Scores (as the Llama Guard 3 card says: "the probability for the first token" is the unsafe class probability):
p_unsafe = P(first word of the answer is `unsafe`); a category's score = p_unsafe x P(it is the first code listed,
followed by a comma or the end of the turn | "unsafe\\n"). No server imports here: the server runs judge() on an
engine thread.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import CamelidError

# Llama Guard 3's categories as its chat template lists them (the model card's longer titles are in parentheses
# there: S3 Sex-Related Crimes, S4 Child Sexual Exploitation, S11 Suicide & Self-Harm)
LG3_CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex Crimes", "S4": "Child Exploitation",
    "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy", "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons", "S10": "Hate", "S11": "Self-Harm", "S12": "Sexual Content",
    "S13": "Elections", "S14": "Code Interpreter Abuse",
}
VERSIONS = (3, 4)
_HEADERS = {  # the guard's chat format around the one user turn (Llama 3 / Llama 4)
    3: ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    4: ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n",
        "<|eot|><|header_start|>assistant<|header_end|>\n\n"),
}
ROLE_NAMES = {"user": "User", "assistant": "Agent"}
MAX_ANSWER_TOKENS = 24  # "unsafe\nS1,S2,S3": a handful of tokens; more is a guard that does not follow the format


class GuardError(CamelidError):
    """The guard could not give a verdict (bad model, malformed answer, too long a conversation)."""


@dataclass(frozen=True)
class Category:
    code: str  # "S1", or a custom code ("S15", "X1")
    name: str  # "Violent Crimes"
    description: str = ""  # optional lines after the name (custom categories)

    def line(self) -> str:
        text = f"{self.code}: {self.name}."
        return text + ("\n" + self.description.strip() if self.description.strip() else "")


DEFAULT_CATEGORIES = tuple(Category(code, name) for code, name in LG3_CATEGORIES.items())
_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")


def check_code(code: str) -> str:
    if not isinstance(code, str) or not _CODE.match(code):
        raise GuardError(f"category code {code!r} must be a capital letter then letters or digits (like S1 or X2)")
    return code


def render_body(messages: Sequence[dict], categories: Sequence[Category]) -> str:
    """The guard's task text (the user turn): categories, conversation, instructions. The last message is judged:
    a user message ('User') or the answer to it ('Agent'). Roles must alternate user/assistant from a user turn."""
    if not messages:
        raise GuardError("the guard needs at least one message to judge")
    if not categories:
        raise GuardError("the guard needs at least one category to check")
    lines = []
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise GuardError("the guard's conversation must alternate user/assistant/user/... from a user turn")
        lines.append(f"{ROLE_NAMES[expected]}: {str(m.get('content') or '').strip()}\n\n")
    role = ROLE_NAMES[messages[-1]["role"]]
    cats = "".join(c.line() + "\n" for c in categories)
    return (f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
            f"with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}<END UNSAFE CONTENT CATEGORIES>\n\n"
            f"<BEGIN CONVERSATION>\n\n{''.join(lines)}<END CONVERSATION>\n\n"
            f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
            " - First line must read 'safe' or 'unsafe'.\n"
            " - If unsafe, a second line must include a comma-separated list of violated categories.")


def render_prompt(messages: Sequence[dict], categories: Sequence[Category] = DEFAULT_CATEGORIES, version: int = 3) -> str:
    """The whole prompt, special tokens as text, up to where the guard writes its answer."""
    if version not in _HEADERS:
        raise GuardError(f"Llama Guard version must be one of {', '.join(map(str, VERSIONS))}, got {version!r}")
    head, tail = _HEADERS[version]
    return head + render_body(messages, categories) + tail


def parse_verdict(text: str, known: Sequence[str]) -> tuple[bool, list[str]]:
    """(unsafe, codes) of a guard's answer; GuardError when it is not `safe` or `unsafe` + known codes."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines and lines[0].lower() == "safe":
        return False, []
    if not lines or lines[0].lower() != "unsafe":
        raise GuardError(f"the guard's answer is not 'safe' or 'unsafe': {text.strip()[:60]!r}")
    codes = [c.strip().upper() for c in lines[1].split(",")] if len(lines) > 1 else []
    unknown = [c for c in codes if c not in known]
    if not codes or unknown:
        raise GuardError(f"the guard said unsafe without known category codes: {text.strip()[:60]!r}")
    return True, codes


@dataclass
class Verdict:
    flagged: bool
    categories: list[str]  # the codes the guard listed (those of the checked set)
    p_unsafe: float
    scores: dict[str, float]  # code -> score in [0, 1], every checked code
    answer: str  # what the guard wrote
    seconds: float


@dataclass
class GuardSession:
    """The guard's KV cache of one conversation's last check. The next check of the same conversation with a longer
    answer (a streamed answer, checked every few hundred characters) computes only the tokens after the common
    prefix: the new answer text and the instructions after it, not the whole prompt again."""

    ids: list[int] = field(default_factory=list)  # the prompt whose KV the cache holds at positions 0..len-1
    cache: object = None
    computed: int = 0  # prompt tokens computed over the session's checks


class Guard:
    """A loaded guard model and the categories it knows (the 14 of Llama Guard 3/4, or the policy's)."""

    def __init__(self, model, tokenizer, version: int = 3, categories: Sequence[Category] = DEFAULT_CATEGORIES,
                 name: str = "guard") -> None:
        if version not in VERSIONS:
            raise GuardError(f"Llama Guard version must be one of {', '.join(map(str, VERSIONS))}, got {version!r}")
        self.model, self.tokenizer, self.version, self.name = model, tokenizer, version, name
        self.categories = {c.code: c for c in categories}
        for word in ("unsafe", "safe"):
            if not tokenizer.encode(word, special=False, bos=False):
                raise GuardError(f"the guard's vocabulary cannot spell {word!r}")
        self._first = {w: tokenizer.encode(w, special=False, bos=False)[0] for w in ("unsafe", "safe")}
        self._comma = tokenizer.encode(",", special=False, bos=False)
        self.max_seq_len = model.config.max_seq_len

    @classmethod
    def load(cls, source: str, version: int | None = None, categories: Sequence[Category] = DEFAULT_CATEGORIES,
             quant: str | None = "auto") -> Guard:
        """Load a guard with camelid's own reader and loader (a store name or a path)."""
        from .formats import read
        from .loader import build_model
        from .store import resolve

        ckpt = read(resolve(source))
        net = build_model(ckpt, quant=quant)
        tok = ckpt.tokenizer
        if version is None:  # Llama 4's vocabulary has <|header_start|>; Llama 3's <|start_header_id|>
            names = {tok.token_text(i) for i in tok.special_ids}
            version = 4 if "<|header_start|>" in names else 3
        return cls(net, tok, version, categories, name=str(source))

    def prompt_ids(self, messages: Sequence[dict], codes: Sequence[str] | None = None) -> list[int]:
        cats = self.checked(codes)
        return self.tokenizer.encode(render_prompt(messages, cats, self.version), special=True, bos=False)

    def checked(self, codes: Sequence[str] | None) -> list[Category]:
        if codes is None:
            return list(self.categories.values())
        unknown = [c for c in codes if c not in self.categories]
        if unknown:
            raise GuardError(f"unknown guard categories {', '.join(unknown)}; the guard knows "
                             f"{', '.join(self.categories)}")
        return [self.categories[c] for c in codes]

    @torch.inference_mode()
    def judge(self, messages: Sequence[dict], codes: Sequence[str] | None = None, scores: bool = True,
              session: GuardSession | None = None) -> Verdict:
        """Run the guard on a conversation (its last message is judged) over `codes` (None: every category).
        scores=False skips the per-category scores (one short forward per category): a check needs the verdict only.
        session: reuse the KV of this conversation's previous check (same verdicts, less computed)."""
        start = time.perf_counter()
        cats = self.checked(codes)
        ids = self.prompt_ids(messages, codes)
        extra = MAX_ANSWER_TOKENS + 8
        if len(ids) + extra > self.max_seq_len:
            raise GuardError(f"the conversation is {len(ids)} guard tokens; the guard's context is {self.max_seq_len}")
        cache, reuse = self._cache_for(ids, len(ids) + extra, session)
        logits = self._forward(ids[reuse:], reuse, cache)
        pos = len(ids)
        answer: list[int] = []
        p_unsafe, decision = None, None
        stops = self.tokenizer.stop_ids
        for _ in range(MAX_ANSWER_TOKENS):
            probs = torch.softmax(logits.float(), -1)
            tok = int(torch.argmax(probs))
            if p_unsafe is None and not self.tokenizer.decode([tok]).isspace():  # the answer's first word
                p_unsafe = float(probs[self._first["unsafe"]])
                decision = pos
            if tok in stops:
                break
            answer.append(tok)
            logits = self._forward([tok], pos, cache)
            pos += 1
        text = self.tokenizer.decode(answer)
        listed = parse_verdict(text, list(self.categories))[1]
        checked = {c.code for c in cats}
        listed = [c for c in listed if c in checked]  # a code switched off for this request is not a hit
        unsafe = bool(listed)
        per_code = self._scores(ids, decision, p_unsafe, cats, cache) if scores else {}
        return Verdict(unsafe, listed, p_unsafe, per_code, text, time.perf_counter() - start)

    def _cache_for(self, ids: list[int], need: int, session: GuardSession | None):
        """(cache, positions already holding ids' KV). Chunked-attention layers (Llama 4) keep one chunk and cannot
        rewind, so they get a fresh cache every time."""
        from .cache import KVCache

        if session is None or getattr(self.model.config, "chunked_layers", ()):
            return KVCache.for_model(self.model, 1, need), 0
        reuse = 0
        if session.cache is not None and session.cache.max_len >= need:
            while reuse < min(len(ids), len(session.ids)) and ids[reuse] == session.ids[reuse]:
                reuse += 1
            reuse = min(reuse, len(ids) - 1)  # the last prompt token is always computed: its logits start the answer
        else:  # room for the answer to grow before the next reallocation
            session.cache = KVCache.for_model(self.model, 1, min(self.max_seq_len, max(need, 2 * len(ids))))
        session.ids = list(ids)
        session.computed += len(ids) - reuse
        return session.cache, reuse

    def _forward(self, tokens: list[int], pos: int, cache) -> torch.Tensor:
        t = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
        positions = torch.arange(pos, pos + len(tokens), device=self.model.device)[None]
        at = torch.tensor([len(tokens) - 1], device=self.model.device)  # only the last position's logits
        return self.model(t, positions, cache, logits_at=at)[0, -1]

    def _scores(self, ids: list[int], pos: int, p_unsafe: float, cats: list[Category], cache) -> dict[str, float]:
        """Each checked code's p_unsafe x P(code listed first | 'unsafe\\n'), teacher-forced from the cache (pos: where
        the answer's first word goes, after any whitespace the guard wrote first)."""
        start = self.tokenizer.encode("unsafe\n", special=False, bos=False)
        logits = self._forward(start, pos, cache)
        base = pos + len(start)
        ends = [*self._comma[:1], *self.tokenizer.stop_ids]
        out = {}
        for c in cats:
            code = self.tokenizer.encode(c.code, special=False, bos=False)
            lp = torch.log_softmax(logits.float(), -1)[code[0]].item()
            t = torch.tensor([code], dtype=torch.long, device=self.model.device)
            positions = torch.arange(base, base + len(code), device=self.model.device)[None]
            steps = torch.log_softmax(self.model(t, positions, cache)[0].float(), -1)  # [len(code), V]
            lp += sum(steps[i, code[i + 1]].item() for i in range(len(code) - 1))
            lp += math.log(max(float(steps[-1].exp()[ends].sum()), 1e-30))
            out[c.code] = max(0.0, min(1.0, p_unsafe * math.exp(lp)))
        return out
