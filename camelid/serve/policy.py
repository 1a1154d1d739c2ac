"""`camelid serve --policy POLICY.toml [--guard MODEL]`: rules and a guard model on the prompt and the answer.

POLICY.toml:

    window = 64                     # characters of a streamed answer held back, so a rule hit is never sent
    [[rule]]
    name = "card"                   # named in verdicts, metrics and errors (default: rule-N)
    pattern = '\\b\\d{4}( \\d{4}){3}\\b' # a Python regular expression
    on = "both"                     # "input" | "output" | "both"
    action = "redact"               # "block" | "redact" | "log"
    replacement = "[redacted]"      # what a redaction writes (default "[redacted]")
    flags = "i"                     # optional: i (ignore case), m, s, x

    [guard]                         # needs --guard MODEL (or model = "..." here)
    on = "both"                     # which side the guard checks
    action = "block"                # "block" | "log"
    categories = ["S1", "S9"]       # the codes checked by default (default: all); a key's own list wins
    every = 256                     # characters of a streamed answer between guard checks
    timeout = 60                    # seconds a check may take; then the request fails closed
    version = 3                     # the prompt format, 3 or 4 (default: from the guard's vocabulary)
    [[guard.category]]              # custom categories, added to (or replacing, with the same code) S1-S14
    code = "X1"
    name = "Competitors"
    description = "Naming or praising a competitor's product."

The prompt is checked before generation: a block is HTTP 400 with `code: "content_filter"` (nothing is generated),
a redaction rewrites the prompt the model reads. The answer is checked while it streams: `window` characters are
held back (with a guard, also everything since the guard's last check), so a hit stops generation and the choice
ends with finish_reason "content_filter" without the offending text ever being sent; redactions replace the text
before it is sent. The same code runs for chat and completions, streaming or not. A guard that fails (error,
malformed answer) fails the request closed: 503 `guard_unavailable`, or an error event in a stream.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tomllib
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import CamelidError
from ..guard import DEFAULT_CATEGORIES, Category, Guard, GuardError, GuardSession, Verdict, check_code
from .params import ApiError

SIDES = ("input", "output", "both")
RULE_ACTIONS = ("block", "redact", "log")
GUARD_ACTIONS = ("block", "log")
DEFAULT_WINDOW = 64
DEFAULT_GUARD_EVERY = 256


@dataclass(frozen=True)
class Rule:
    name: str
    regex: re.Pattern
    on: str
    action: str
    replacement: str = "[redacted]"

    def applies(self, stage: str) -> bool:
        return self.on in (stage, "both")


@dataclass
class GuardSettings:
    on: str = "both"
    action: str = "block"
    codes: tuple[str, ...] | None = None  # None: every category the guard knows
    every: int = DEFAULT_GUARD_EVERY
    version: int | None = None
    model: str | None = None
    categories: tuple[Category, ...] = DEFAULT_CATEGORIES
    timeout: float = 60.0

    def applies(self, stage: str) -> bool:
        return self.on in (stage, "both")


@dataclass
class Policy:
    rules: tuple[Rule, ...] = ()
    window: int = DEFAULT_WINDOW
    guard_settings: GuardSettings | None = None
    guard: Guard | None = None
    executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    def rules_for(self, stage: str) -> list[Rule]:
        return [r for r in self.rules if r.applies(stage)]

    def guards(self, stage: str) -> bool:
        return self.guard is not None and self.guard_settings.applies(stage)

    @property
    def output_window(self) -> int:
        return self.window if self.rules_for("output") else 0


# --- the file ---

def _choice(table: dict, key: str, allowed: tuple, default, where: str):
    value = table.get(key, default)
    if value not in allowed:
        raise CamelidError(f"{where}: '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _int(table: dict, key: str, default: int, low: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CamelidError(f"{where}: '{key}' must be an integer >= {low}, got {value!r}")
    return value


def _regex(pattern, flags: str, where: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise CamelidError(f"{where}: 'pattern' must be a non-empty string (a regular expression)")
    bits = 0
    for f in flags:
        if f not in "imsx":
            raise CamelidError(f"{where}: unknown flag {f!r} in 'flags' (use i, m, s, x)")
        bits |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}[f]
    try:
        regex = re.compile(pattern, bits)
    except re.error as e:
        raise CamelidError(f"{where}: 'pattern' {pattern!r} is not a valid regular expression: {e}") from None
    if regex.fullmatch(""):
        raise CamelidError(f"{where}: 'pattern' {pattern!r} matches the empty string, so it would match everywhere")
    return regex


def parse_policy(data: dict, source: str = "policy") -> Policy:
    """A Policy from the TOML's tables; CamelidError naming the bad entry."""
    known = {"window", "rule", "guard"}
    extra = set(data) - known
    if extra:
        raise CamelidError(f"{source}: unknown setting {sorted(extra)[0]!r} (known: {', '.join(sorted(known))})")
    window = _int(data, "window", DEFAULT_WINDOW, 0, source)
    rules = []
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise CamelidError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    names = set()
    for i, r in enumerate(entries, 1):
        where = f"{source}: rule {i}"
        if not isinstance(r, dict):
            raise CamelidError(f"{where}: must be a table")
        unknown = set(r) - {"name", "pattern", "on", "action", "replacement", "flags"}
        if unknown:
            raise CamelidError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        name = r.get("name", f"rule-{i}")
        if not isinstance(name, str) or not name or name in names:
            raise CamelidError(f"{where}: 'name' must be a unique non-empty string, got {name!r}")
        names.add(name)
        replacement = r.get("replacement", "[redacted]")
        if not isinstance(replacement, str):
            raise CamelidError(f"{where}: 'replacement' must be a string")
        rules.append(Rule(name, _regex(r.get("pattern"), str(r.get("flags", "")), where),
                          _choice(r, "on", SIDES, "both", where), _choice(r, "action", RULE_ACTIONS, "block", where),
                          replacement))
    guard = None
    if "guard" in data:
        g = data["guard"]
        where = f"{source}: [guard]"
        if not isinstance(g, dict):
            raise CamelidError(f"{where}: must be a table")
        unknown = set(g) - {"on", "action", "categories", "every", "version", "model", "category", "timeout"}
        if unknown:
            raise CamelidError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        cats = {c.code: c for c in DEFAULT_CATEGORIES}
        for j, c in enumerate(g.get("category", []), 1):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].strip():
                raise CamelidError(f"{where}: category {j} needs 'code' and a non-empty 'name'")
            try:
                code = check_code(c.get("code"))
            except GuardError as e:
                raise CamelidError(f"{where}: category {j}: {e}") from None
            cats[code] = Category(code, c["name"].strip().rstrip("."), str(c.get("description", "")))
        codes = g.get("categories")
        if codes is not None:
            if not isinstance(codes, list) or not codes or any(c not in cats for c in codes):
                raise CamelidError(f"{where}: 'categories' must list known codes ({', '.join(cats)}), got {codes!r}")
            codes = tuple(codes)
        version = g.get("version")
        if version is not None and version not in (3, 4):
            raise CamelidError(f"{where}: 'version' must be 3 or 4, got {version!r}")
        model = g.get("model")
        if model is not None and not isinstance(model, str):
            raise CamelidError(f"{where}: 'model' must be a string (a store name or a path)")
        timeout = g.get("timeout", 60.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise CamelidError(f"{where}: 'timeout' must be a number of seconds > 0, got {timeout!r}")
        guard = GuardSettings(_choice(g, "on", SIDES, "both", where), _choice(g, "action", GUARD_ACTIONS, "block", where),
                              codes, _int(g, "every", DEFAULT_GUARD_EVERY, 1, where), version, model, tuple(cats.values()),
                              float(timeout))
    return Policy(tuple(rules), window, guard)


def load_policy(path: str | None, guard_model: str | None = None, guard_version: int | None = None) -> Policy | None:
    """--policy FILE and --guard MODEL as a Policy with its guard loaded (None when neither is given)."""
    if path is None and guard_model is None:
        return None
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise CamelidError(f"--policy {path}: no such file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise CamelidError(f"--policy {path}: not valid TOML: {e}") from None
        policy = parse_policy(data, f"--policy {path}")
    else:
        policy = Policy()
    settings = policy.guard_settings
    model = guard_model or (settings.model if settings else None)
    if settings is not None and model is None:
        raise CamelidError(f"--policy {path}: a [guard] table needs --guard MODEL (or model = ... in it)")
    if model is not None:
        settings = policy.guard_settings = settings or GuardSettings()
        try:
            policy.guard = Guard.load(model, guard_version or settings.version, settings.categories)
        except GuardError as e:
            raise CamelidError(f"--guard {model}: {e}") from None
        policy.executor = ThreadPoolExecutor(1, thread_name_prefix="camelid-guard")
    return policy


# --- running it ---

def _key_codes(request: Request, policy: Policy) -> tuple[str, ...] | None:
    key = request.scope.get("camelid.key")
    codes = getattr(key, "categories", None) if key is not None else None
    return tuple(codes) if codes is not None else policy.guard_settings.codes


def _key_name(request: Request) -> str:
    key = request.scope.get("camelid.key")
    return getattr(key, "name", None) or "none"


def _verdict(request: Request, **v) -> None:
    from .app import record

    rec = record(request)
    rec.setdefault("verdicts", []).append(v)
    metrics = request.app.state.camelid.metrics
    metrics.policy_verdicts.inc(stage=v["stage"], source=v["source"], action=v["action"])
    if v["action"] == "block":
        for cat in v.get("categories") or [v.get("rule")]:
            metrics.policy_blocks.inc(key=_key_name(request), stage=v["stage"], category=str(cat))


async def judge(request: Request, policy: Policy, messages: list[dict], codes: tuple[str, ...] | None,
                scores: bool = False, session: GuardSession | None = None) -> Verdict:
    """The guard's verdict (scores: with per-category scores), run on its own thread; a failure is a 503 (the request
    fails closed)."""
    metrics = request.app.state.camelid.metrics
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    try:
        work = loop.run_in_executor(policy.executor, policy.guard.judge, messages, codes, scores, session)
        verdict = await asyncio.wait_for(work, policy.guard_settings.timeout)
    except TimeoutError:
        metrics.guard_failures.inc()
        raise ApiError(503, f"the content guard did not answer within {policy.guard_settings.timeout:g} s, so the "
                       "request was refused", None, "guard_unavailable", type="server_error") from None
    except Exception as e:  # the guard's own error, a malformed answer, out of memory: fail closed
        metrics.guard_failures.inc()
        raise ApiError(503, f"the content guard failed, so the request was refused: {e}", None, "guard_unavailable",
                       type="server_error") from None
    finally:
        metrics.guard_latency.observe(time.perf_counter() - start)
    return verdict


def blocked(stage: str, why: str) -> ApiError:
    return ApiError(400, f"the {stage} was blocked by the server's content policy ({why})", None, "content_filter")


def conversation(messages: list[dict]) -> list[dict]:
    """A chat as the guard reads it: user and assistant turns alternating from a user turn (system and tool turns
    left out, turns of one role in a row joined, text parts joined), ending at the last user turn."""
    out: list[dict] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            continue
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        content = content if isinstance(content, str) else ""
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        elif out or role == "user":
            out.append({"role": role, "content": content})
    while out and out[-1]["role"] != "user":
        out.pop()
    return out


def _rewrite(rules: list[Rule], request: Request, stage: str, text: str) -> str:
    """Apply the rules to one input text: raise on a block, record logs, return the text redacted."""
    for r in rules:
        if not r.regex.search(text):
            continue
        _verdict(request, stage=stage, source="rule", rule=r.name, action=r.action)
        if r.action == "block":
            raise blocked("prompt", f"rule {r.name}")
        if r.action == "redact":
            text = r.regex.sub(r.replacement, text)
    return text


async def check_messages(request: Request, policy: Policy | None, messages: list[dict]) -> list[dict]:
    """The chat messages, checked before generation (rules on every message's text, the guard on the chat)."""
    if policy is None:
        return messages
    rules = policy.rules_for("input")
    out = []
    for m in messages:
        content = m.get("content")
        if rules and isinstance(content, str):
            m = {**m, "content": _rewrite(rules, request, "input", content)}
        elif rules and isinstance(content, list):
            m = {**m, "content": [{**p, "text": _rewrite(rules, request, "input", p["text"])}
                                  if isinstance(p, dict) and isinstance(p.get("text"), str) else p for p in content]}
        out.append(m)
    if policy.guards("input"):
        chat = conversation(out)
        if chat:
            await _guard_input(request, policy, chat)
    return out


async def check_prompt(request: Request, policy: Policy | None, prompt):
    """A completion's prompt (a string; token ids are decoded for the guard only), checked before generation."""
    if policy is None:
        return prompt
    if isinstance(prompt, str):
        prompt = _rewrite(policy.rules_for("input"), request, "input", prompt)
        text = prompt
    else:
        from .app import state_of

        text = state_of(request).tokenizer.decode(prompt)  # the model the request runs on (several models)
        for r in policy.rules_for("input"):
            if r.regex.search(text):
                _verdict(request, stage="input", source="rule", rule=r.name, action=r.action)
                if r.action != "log":  # token ids cannot be rewritten: a redaction blocks them
                    raise blocked("prompt", f"rule {r.name}")
    if policy.guards("input") and text.strip():
        await _guard_input(request, policy, [{"role": "user", "content": text}])
    return prompt


async def _guard_input(request: Request, policy: Policy, chat: list[dict]) -> None:
    v = await judge(request, policy, chat, _key_codes(request, policy))
    if v.flagged:
        action = policy.guard_settings.action
        _verdict(request, stage="input", source="guard", categories=v.categories, action=action)
        if action == "block":
            raise blocked("prompt", "guard categories " + ",".join(v.categories))


class OutputFilter:
    """One choice's answer on its way out: holds back `window` characters (and, with a guard, everything since the
    guard's last check) so that no rule hit or flagged text is ever released; redacts what it releases."""

    def __init__(self, request: Request, policy: Policy, context: list[dict]) -> None:
        self.request, self.policy = request, policy
        self.rules = policy.rules_for("output")
        self.window = policy.window if self.rules else 0
        self.guarded = policy.guards("output")
        self.context = context  # the conversation the answer replies to (for the guard)
        self.sent = ""  # released (after redaction)
        self.raw_sent = ""  # released (before redaction), for the guard
        self.pending = ""
        self.checked = 0  # chars of pending the guard has seen and passed
        self.logged: set[str] = set()
        self.blocked = False
        self.session = GuardSession() if self.guarded else None  # each check reuses the last one's KV

    def _scan(self) -> None:
        tail = self.raw_sent[-self.window:] if self.window else ""
        text = tail + self.pending
        for r in self.rules:
            if r.action == "redact":
                continue
            m = next((m for m in r.regex.finditer(text) if m.end() > len(tail)), None)
            if m is None:
                continue
            if r.action == "log":
                if r.name not in self.logged:
                    self.logged.add(r.name)
                    _verdict(self.request, stage="output", source="rule", rule=r.name, action="log")
                continue
            _verdict(self.request, stage="output", source="rule", rule=r.name, action="block")
            self.blocked = True
            return

    async def _guard(self) -> None:
        answer = self.raw_sent + self.pending
        if not answer.strip():
            self.checked = len(self.pending)
            return
        chat = [*self.context, {"role": "assistant", "content": answer}] if self.context else \
            [{"role": "user", "content": ""}, {"role": "assistant", "content": answer}]
        v = await judge(self.request, self.policy, chat, _key_codes(self.request, self.policy), session=self.session)
        self.checked = len(self.pending)
        if v.flagged:
            action = self.policy.guard_settings.action
            _verdict(self.request, stage="output", source="guard", categories=v.categories, action=action)
            if action == "block":
                self.blocked = True

    def _release(self, upto: int) -> str:
        for r in self.rules:  # never cut through a redaction's match
            if r.action == "redact":
                for m in r.regex.finditer(self.pending):
                    if m.start() < upto < m.end():
                        upto = m.start()
        piece, self.pending = self.pending[:upto], self.pending[upto:]
        self.checked = max(0, self.checked - upto)
        self.raw_sent += piece
        for r in self.rules:
            if r.action == "redact" and r.regex.search(piece):
                if r.name not in self.logged:
                    self.logged.add(r.name)
                    _verdict(self.request, stage="output", source="rule", rule=r.name, action="redact")
                piece = r.regex.sub(r.replacement, piece)
        self.sent += piece
        return piece

    async def feed(self, text: str, flush: bool = False) -> str:
        """The text that may go out now ("" while held back). Sets `blocked` on a hit (then nothing more goes out)."""
        if self.blocked:
            return ""
        self.pending += text
        self._scan()
        if self.blocked:
            return ""
        if self.guarded and (flush or len(self.pending) - self.checked >= self.policy.guard_settings.every):
            await self._guard()
            if self.blocked:
                return ""
        upto = len(self.pending) if flush else len(self.pending) - self.window
        if self.guarded:
            upto = min(upto, self.checked)
        return self._release(max(0, upto))

    async def finish(self) -> str:
        """Everything still held back, checked (the answer is complete)."""
        return await self.feed("", flush=True)


async def filtered(request: Request, policy: Policy | None, gen, context: list[dict]):
    """gen.events(request) through each choice's OutputFilter: (choice, released text, token event). A blocked
    choice is cancelled and finishes with "content_filter"; what was held back of it is dropped."""
    if policy is None or not (policy.rules_for("output") or policy.guards("output")):
        async for item in gen.events(request):
            yield item
        return
    filters = {c.index: OutputFilter(request, policy, context) for c in gen.choices}
    special = gen.state.tokenizer.special_ids
    async for choice, text, token in gen.events(request):
        f = filters[choice.index]
        if f.blocked:
            continue
        done = choice.finish_reason is not None
        marker = token is not None and token.id in special  # a tool-call marker: what precedes it goes out first
        out = await f.feed(text, flush=marker) if not done else await f.feed(text) + await f.finish()
        if f.blocked:
            if not done:
                gen.state.engine.cancel(choice.seq)
            choice.finish_reason = "content_filter"
        yield choice, out, token


# --- POST /v1/moderations ---

async def moderations(request: Request) -> Response:
    """OpenAI's moderations: one result per input, from the guard (scores from its token probabilities) and the
    rules (a rule's category is `rule/NAME`, score 1 or 0)."""
    from .app import read_json, record

    policy: Policy | None = request.app.state.policy
    if policy is None:
        raise ApiError(404, "moderation needs a content policy: start the server with --policy or --guard", None,
                       "not_found")
    state = request.app.state.camelid
    body = await read_json(request, state.limits)
    value = body.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        if isinstance(items, list) and items and all(isinstance(x, dict) for x in items):  # multimodal-style parts
            items = [x.get("text") for x in items if x.get("type") == "text"]
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            raise ApiError(400, "'input' must be a string, a list of strings, or a list of text parts", "input",
                           "invalid_type")
    if len(items) > 32:
        raise ApiError(400, f"'input' has {len(items)} items; at most 32 per request", "input", "invalid_value")
    results = []
    codes = _key_codes(request, policy) if policy.guard is not None else None
    for text in items:
        categories: dict[str, bool] = {}
        scores: dict[str, float] = {}
        if policy.guard is not None:
            v = await judge(request, policy, [{"role": "user", "content": text}], codes, scores=True)
            for code, score in v.scores.items():
                categories[code] = code in v.categories
                scores[code] = round(score, 6)
            if v.flagged:
                _verdict(request, stage="input", source="guard", categories=v.categories, action="log")
        for r in policy.rules:
            hit = bool(r.regex.search(text))
            categories[f"rule/{r.name}"], scores[f"rule/{r.name}"] = hit, float(hit)
            if hit:
                _verdict(request, stage="input", source="rule", rule=r.name, action="log")
        results.append({"flagged": any(categories.values()), "categories": categories, "category_scores": scores,
                        "category_applied_input_types": {k: ["text"] for k in categories}})
    model = policy.guard.name if policy.guard is not None else "camelid-rules"
    record(request, model=model)
    return JSONResponse({"id": "modr-" + secrets.token_hex(12), "model": model, "results": results})
