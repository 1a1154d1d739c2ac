"""Continuous batching: many sequences share one KV cache of N slot rows and one decode forward per step.

The engine runs in its own thread. Each step it
  1. drops cancelled sequences (their slot is free at once) and admits waiting ones into free slots,
  2. runs one forward over every decoding row (one new token each; idle rows get a harmless dummy),
  3. prefills waiting prompts chunk by chunk, one row at a time, so a long prompt costs the running
     streams one chunk of delay per step instead of stalling them.
Between steps it runs at most one job given to `call` (an embedding or rerank forward over the same weights), so
such work interleaves with the running streams instead of racing them for the model.
A row asking for speculation (`speculate`: "ngram" for prompt lookup, "draft" for the engine's draft model;
camelid/speculate.py) that decodes alone and unconstrained takes step 2 as one verification forward of its pending
token and up to DRAFT_TOKENS drafted ones (every query attended as plain decoding attends it alone). A greedy row
emits the tokens the model agrees with, the same tokens plain decoding gives; a sampled row keeps each draft by
speculative sampling's rule, so its tokens have plain sampling's distribution. Several tokens come per forward where
the drafts are right. Beside other decoding rows it decodes plainly, since the batch already keeps the cores busy;
a draft model catches up on the tokens it missed when the row is alone again.
Chunk boundaries (camelid/prompt_cache.py's schedule: `prefill_chunk` tokens, then small chunks for the
tail) and sampling depend only on the sequence itself, never on its neighbours or on what is cached, so a
greedy request gives the same tokens alone or beside others, with the prompt cache cold or warm.

The prompt cache: a row's first prefill step copies in the longest cached chain of its prompt's chunks;
every whole chunk it computes is kept. When a request ends, its reply's whole chunks are computed and kept
too once the engine has been idle for FILL_DELAY (a "fill", preempted by any new request), so the next turn of
a conversation prefills only its new tokens and the tail of the last chunk.

Results go out through each sequence's `emit` callback (called on the engine thread): Token events,
then exactly one Finish.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..compiled import step_for
from ..prompt_cache import BIG_CHUNK, SMALL_CHUNK, BlockStore, PromptCache
from ..sampling import GREEDY, SamplingParams, apply_logit_bias, apply_penalties, draw, filter_logits, probabilities, sample
from ..speculate import DRAFT_TOKENS, DraftLength, ModelDrafter, NgramDrafter, accept_or_resample
from ..tokenizer import Tokenizer
from .constrained import JsonConstraint

FILL_DELAY = 0.1  # seconds idle before a finished reply is filled back in: a client sending its next request at once
# (a script, a benchmark) never waits on a fill's chunk, while a person's next turn comes seconds later


class QueueFullError(Exception):
    """Every slot is busy and the waiting queue is full."""


class EngineStoppedError(Exception):
    """The engine is not running (shutting down, or it failed)."""


@dataclass
class Token:
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (id, logprob), best first, when asked


@dataclass
class Finish:
    reason: str  # "stop", "length", "cancelled", "error"
    message: str = ""


@dataclass(eq=False)
class Sequence_:
    """One generation. `max_tokens` is already clipped to the slot length by the caller (or by submit)."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Token | Finish], None]
    sampling: SamplingParams = GREEDY
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    constraint: JsonConstraint | None = None
    adapter: str | None = None  # the LoRA adapter this sequence runs with (None: the base model)
    echo: bool = False  # score the prompt too: prompt_logprobs[i] is prompt token i+1's Token (logprobs, top)
    prompt_logprobs: list[Token] = field(default_factory=list)
    salt: str | None = None  # cache_salt: reuse only blocks made under the same salt
    background: bool = False  # a fill: prefill only, to keep a finished reply's chunks; never emits
    speculate: str = "none"  # "ngram" (prompt lookup) or "draft" (the engine's draft model) when it decodes alone
    # engine state
    slot: int = -1
    pos: int = 0  # tokens of this row in the cache
    pending: int | None = None  # the last sampled token, to be fed next step
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    generator: torch.Generator | None = None
    cached: int = -1  # prompt tokens restored from the prompt cache (-1: not looked up yet)
    chain: bytes = b""  # the prompt cache's chain key after the last chunk in the cache row
    drafter: ModelDrafter | None = None  # speculate="draft": the draft model's own KV cache for this row
    draft_length: DraftLength | None = None  # how many tokens to draft next (adapts to what the model keeps)


class Engine:
    """The continuous-batching scheduler over one model. Thread-safe submit / cancel."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_concurrency: int = 8,
                 max_seq_len: int | None = None, max_queue: int | None = None, prefill_chunk: int = BIG_CHUNK,
                 prompt_cache: PromptCache | None = None, draft_model: torch.nn.Module | None = None) -> None:
        """draft_model: a smaller model with the same vocabulary, for rows with speculate="draft"."""
        self.model, self.tokenizer = model, tokenizer
        self.draft_model = draft_model
        self.slots = max_concurrency
        self.max_seq_len = min(max_seq_len or 4096, model.config.max_seq_len)
        self.max_queue = max_queue if max_queue is not None else 4 * max_concurrency
        self.prefill_chunk = prefill_chunk
        # off (a store of 0 bytes) still prefills by the same schedule: the cache never changes the numbers
        self.prompt_cache = prompt_cache or PromptCache(BlockStore(0), "", prefill_chunk, min(SMALL_CHUNK, prefill_chunk))
        self.prompt_cache.bind(model)  # to the token where the model computes small chunks' tokens independently
        self._fills: deque[tuple[list[int], str | None, str | None]] = deque(maxlen=max_concurrency)
        self._finished_at = 0.0  # time.monotonic() of the last row's end: fills wait for FILL_DELAY of idleness
        self.device = model.device
        self.cache = KVCache.for_model(model, max_concurrency, self.max_seq_len)
        # per layer (slots, bytes per position of one row): the running rows' KV counts against --cache-mb
        self._kv_per_position = [(k.shape[2], 2 * k[0, :, 0].numel() * k.element_size()) for k in self.cache.k]
        self.rows: list[Sequence_ | None] = [None] * max_concurrency
        self.waiting: deque[Sequence_] = deque()
        self.jobs: deque[tuple[Callable[[], object], str | None, Future]] = deque()  # see call()
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.drafted_tokens = self.accepted_tokens = 0  # speculation: tokens proposed / confirmed by the model
        self._ngram = NgramDrafter()
        self._special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)
        self._bytes_to_id = {b: i for i, b in enumerate(tokenizer.token_bytes) if i not in tokenizer.special_ids and b}
        self._max_token_len = max(len(b) for b in self._bytes_to_id)
        self._adapters = _adapter_selector(model)

    def _use_adapters(self, rows: Sequence[Sequence_ | None]) -> None:
        """Tell the model's LoRA layers which adapter each row of the next forward uses (no-op without adapters)."""
        if self._adapters is not None:
            self._adapters(self.model, [s.adapter if s is not None else None for s in rows])

    # --- public, any thread ---
    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="camelid-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, seq: Sequence_) -> None:
        """Queue a sequence; QueueFullError when slots and queue are full, EngineStoppedError when not running."""
        if not seq.prompt or len(seq.prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens does not fit the slot length {self.max_seq_len}")
        seq.max_tokens = min(seq.max_tokens, self.max_seq_len - len(seq.prompt))
        if seq.speculate not in ("none", "ngram", "draft") or (seq.speculate == "draft" and self.draft_model is None):
            raise ValueError(f"speculate={seq.speculate!r}: expected 'none', 'ngram' or 'draft' (with a draft model)")
        with self.cond:
            if not self.running:
                raise EngineStoppedError(self.error or "the engine is not running")
            free = sum(r is None or r.background for r in self.rows)
            if len(self.waiting) >= self.max_queue + free:  # waiting ones take free slots first
                raise QueueFullError(f"{self.slots} sequences running and {len(self.waiting)} waiting")
            self.waiting.append(seq)
            self.cond.notify_all()

    def call(self, fn: Callable[[], object], adapter: str | None = None) -> Future:
        """Run fn() on the engine thread between two steps (an embedding forward); the Future gets its result or
        exception. adapter: the LoRA adapter the model uses meanwhile (None: the base). QueueFullError when
        max_queue jobs wait already, EngineStoppedError when not running."""
        future: Future = Future()
        with self.cond:
            if not self.running:
                raise EngineStoppedError(self.error or "the engine is not running")
            if len(self.jobs) >= self.max_queue:
                raise QueueFullError(f"{len(self.jobs)} embedding jobs waiting")
            self.jobs.append((fn, adapter, future))
            self.cond.notify_all()
        return future

    def cancel(self, seq: Sequence_) -> None:
        """Stop a sequence (client gone, stop string seen); its slot is freed before the next step."""
        with self.cond:
            seq.cancelled = True
            self.cond.notify_all()

    @property
    def active(self) -> int:
        return sum(r is not None and not r.background for r in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # --- engine thread ---
    def _loop(self) -> None:
        while True:
            with self.cond:
                self._admit()
                while self.running and not any(self.rows) and not self.waiting and not self.jobs:
                    idle = time.monotonic() - self._finished_at
                    if self._fills and idle >= FILL_DELAY:  # idle: keep the last replies' chunks for their next turn
                        self._start_fill()
                        break
                    self.cond.wait(FILL_DELAY - idle if self._fills else None)
                    self._admit()
                if not self.running:
                    break
                job = self.jobs.popleft() if self.jobs else None
            if job is not None:
                self._run_job(*job)
            try:
                if any(self.rows):
                    self._step()
            except Exception as e:  # a bug or out of memory: fail the running sequences, keep serving
                message = f"{type(e).__name__}: {e}"
                for b, s in enumerate(self.rows):
                    if s is not None:
                        self._finish(b, Finish("error", message))
        with self.cond:
            for b, s in enumerate(self.rows):
                if s is not None:
                    self._finish(b, Finish("error", "the server is shutting down"))
            while self.waiting:
                self.waiting.popleft().emit(Finish("error", "the server is shutting down"))
            while self.jobs:
                self.jobs.popleft()[2].set_exception(EngineStoppedError("the server is shutting down"))

    def _run_job(self, fn: Callable[[], object], adapter: str | None, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode(), self._adapter_for_all(adapter):
                future.set_result(fn())
        except Exception as e:  # the job's own error (or out of memory): its caller answers it
            future.set_exception(e)

    def _adapter_for_all(self, adapter: str | None):
        if self._adapters is None:
            return nullcontext()
        from ..train.lora import use_adapters

        return use_adapters(self.model, adapter)

    def _admit(self) -> None:
        """Free cancelled rows and fill free rows (lowest first) from the queue. Holds self.cond."""
        for b, s in enumerate(self.rows):
            if s is not None and s.cancelled:
                self._finish(b, Finish("cancelled"))
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            s.emit(Finish("cancelled"))
        if self.waiting:  # a fill runs only while nothing else wants the engine
            for b, s in enumerate(self.rows):
                if s is not None and s.background:
                    self._finish(b, Finish("cancelled"))
        for b in range(self.slots):
            if self.rows[b] is None and self.waiting:
                s = self.waiting.popleft()
                s.slot, s.pos, s.pending, s.generated, s.drafter = b, 0, None, [], None
                s.draft_length = DraftLength() if s.speculate != "none" else None
                s.generator = s.sampling.generator()
                self.rows[b] = s
                self.prompt_tokens += len(s.prompt)

    def _finish(self, b: int, event: Finish) -> None:
        s = self.rows[b]
        self.rows[b] = None
        self._finished_at = time.monotonic()
        if s is not None:
            s.slot, s.drafter = -1, None  # the draft's KV cache goes with the row
            if event.reason in ("stop", "length") and not s.background and self.prompt_cache.enabled:
                tokens = s.prompt + s.generated
                end = self.prompt_cache.reusable_end(len(tokens), s.adapter)
                if end > self.prompt_cache.reusable_end(len(s.prompt), s.adapter):
                    self._fills.append((tokens[:end], s.adapter, s.salt))
            s.emit(event)
        self._reserve()

    def _start_fill(self) -> None:
        """Put the newest finished reply back into row 0 as a background prefill. Holds self.cond."""
        tokens, adapter, salt = self._fills.pop()
        self.rows[0] = Sequence_(tokens, 0, _ignore, adapter=adapter, salt=salt, background=True, slot=0)

    def _reserve(self) -> None:
        """Tell the prompt cache's store how many bytes of KV the running requests hold now (not a background fill:
        its KV is on its way into the store, which counts it there)."""
        if self.prompt_cache.enabled:
            held = sum(min(s.pos, slots) * nbytes for s in self.rows if s is not None and not s.background
                       for slots, nbytes in self._kv_per_position)
            self.prompt_cache.store.reserve(self, held)

    @torch.inference_mode()
    def _step(self) -> None:
        self._reserve()
        self.steps += 1
        decoding = [b for b, s in enumerate(self.rows) if s is not None and s.pending is not None]
        if len(decoding) == 1 and self._speculative_step(decoding[0]):
            pass
        elif decoding:
            self._decode(decoding)
        # prefill: whole chunks, so boundaries never depend on the load; fewer while others are decoding, and one
        # a step for a fill, so a request that arrives meanwhile waits for one chunk at most
        budget = 1 if decoding or any(s is not None and s.background for s in self.rows) else 4
        for b, s in enumerate(self.rows):
            while budget and s is not None and s.pending is None and self.rows[b] is s:
                budget -= 1
                self._prefill_chunk(b, s)
            if not budget:
                break

    def _decode(self, decoding: list[int]) -> None:
        R = max(decoding) + 1
        tokens = torch.zeros(R, 1, dtype=torch.long)
        positions = torch.zeros(R, 1, dtype=torch.long)
        for b in range(R):
            s = self.rows[b]
            if s is not None and s.pending is not None:
                tokens[b, 0], positions[b, 0] = s.pending, s.pos
            elif s is not None:  # prefilling: write the dummy where its next chunk will overwrite it
                positions[b, 0] = s.pos
        self._use_adapters(self.rows[:R])
        tokens, positions, cache = tokens.to(self.device), positions.to(self.device), self.cache.view(0, R)
        step = step_for(self.model)  # the compiled decode step when one is built (camelid compile)
        logits = (step(tokens, positions, cache) if step else self.model(tokens, positions, cache)[:, -1]).float().cpu()
        for b in decoding:
            s = self.rows[b]
            s.pos += 1
            self._next_token(b, s, logits[b])

    def _speculative_step(self, b: int) -> bool:
        """Row b's next tokens from one forward over its pending token and the drafted ones; False (nothing done)
        when the row does not speculate or nothing was drafted, so the step decodes plainly."""
        s = self.rows[b]
        if s.speculate == "none" or s.constraint is not None or step_for(self.model) is not None:
            return False  # a compiled decode step: plain steps through it (camelid/speculate.py says why)
        room = s.draft_length.next(min(DRAFT_TOKENS, s.max_tokens - len(s.generated) - 1, self.max_seq_len - s.pos - 1))
        if room <= 0:
            return False
        if s.speculate == "draft":
            if s.drafter is None:
                s.drafter = ModelDrafter(self.draft_model)
                s.drafter.reset(len(s.prompt) + s.max_tokens)
            drafter = s.drafter
        else:
            drafter = self._ngram
        drafts, q = drafter.propose(s.prompt + s.generated, room, s.sampling, s.generator)
        if not drafts:
            return False
        tokens = torch.tensor([[s.pending, *drafts]], dtype=torch.long, device=self.device)
        positions = torch.arange(s.pos, s.pos + len(drafts) + 1, device=self.device)[None]
        cache = self.cache.view(b, b + 1)
        cache.query_by_query = True  # each query over its own prefix, as plain decoding computes it alone
        self._use_adapters([s])
        logits = self.model(tokens, positions, cache)[0].float().cpu()  # [1 + drafts, V]
        self.drafted_tokens += len(drafts)
        s.pos += 1  # the pending token's keys and values are in the cache now
        for j, d in enumerate(drafts):
            s.pending = None
            if s.sampling.greedy:
                self._next_token(b, s, logits[j])  # plain decoding's choice (penalties and bias included)
            else:  # keep d with probability min(1, p(d)/q(d)), else a token from the rest of p: p's distribution
                tok, _ = accept_or_resample(self._distribution(s, logits[j]), q[j] if q is not None else None, d,
                                            s.generator)
                self._next_token(b, s, logits[j], tok)
            if self.rows[b] is not s or s.pending != d:  # finished, or the model disagrees: its own token is next
                s.draft_length.update(len(drafts), j)
                return True
            self.accepted_tokens += 1
            s.pos += 1  # draft j was the model's token, and its keys and values were computed in this forward
        s.draft_length.update(len(drafts), len(drafts))
        s.pending = None  # every draft accepted: one more token from the last position
        self._next_token(b, s, logits[len(drafts)])
        return True

    def _distribution(self, s: Sequence_, logits: torch.Tensor) -> torch.Tensor:
        """The distribution row s samples its next token from (as _sample draws it)."""
        out = torch.tensor(s.generated, dtype=torch.long)
        return probabilities(logits, s.sampling, torch.cat([torch.tensor(s.prompt, dtype=torch.long), out]), out)

    def _prefill_chunk(self, b: int, s: Sequence_) -> None:
        pc = self.prompt_cache
        if s.cached < 0:  # the first step of this row: the cached chunks of its prompt, copied in
            if s.echo:  # every prompt position's logits are wanted: nothing restored
                s.cached, s.chain = 0, pc.root(s.adapter, s.salt)
            else:
                s.cached, s.chain = pc.restore(self.cache, b, s.prompt, s.adapter, s.salt,
                                               compute_last=not s.background)
            s.pos = s.cached
            if not s.background:
                pc.store.count(s.cached)
            elif s.pos == len(s.prompt):  # a fill with nothing left to compute
                self._finish(b, Finish("stop"))
                return
        start = s.pos
        end = pc.next_chunk(start, len(s.prompt))
        tokens = torch.tensor([s.prompt[start:end]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        at = torch.tensor([end - start - 1], device=self.device)
        self._use_adapters([s])
        if s.echo and s.logprobs is not None:  # every position's logits: each predicts the next prompt token
            every = self.model(tokens, positions, self.cache.view(b, b + 1))[0].float().cpu()  # [T,V]
            for i, logits in enumerate(every[:len(s.prompt) - 1 - start]):
                s.prompt_logprobs.append(self._scored(s, s.prompt[start + i + 1], logits))
            logits = every[-1]
        else:
            logits = self.model(tokens, positions, self.cache.view(b, b + 1), logits_at=at)[0, -1].float().cpu()
        s.chain = pc.save(self.cache, b, s.prompt, start, end, s.chain, s.adapter)
        s.pos = end
        if end == len(s.prompt):
            if s.background:
                self._finish(b, Finish("stop"))
            else:
                self._next_token(b, s, logits)

    def _next_token(self, b: int, s: Sequence_, logits: torch.Tensor, chosen: int | None = None) -> None:
        """Sample row b's next token from its logits [V] (or take `chosen`, drawn by the caller), emit it, and finish
        the row when due."""
        if s.max_tokens <= 0:
            self._finish(b, Finish("length"))
            return
        if s.constraint is not None:
            forced = self._forced_completion(s)
            if forced is not None:
                for tok in forced:
                    self._emit_token(s, tok, logits if tok == forced[0] else None)
                self._finish(b, Finish("length"))
                return
            tok = self._sample_constrained(s, logits)
        else:
            tok = self._sample(s, logits) if chosen is None else chosen
        self._emit_token(s, tok, logits)
        if tok in s.stop_ids or (s.constraint is not None and s.constraint.done):
            self._finish(b, Finish("stop"))
        elif len(s.generated) >= s.max_tokens:
            self._finish(b, Finish("length"))
        else:
            s.pending = tok

    def _emit_token(self, s: Sequence_, tok: int, logits: torch.Tensor | None) -> None:
        s.generated.append(tok)
        self.generated_tokens += 1
        if s.constraint is not None and tok not in s.stop_ids:
            s.constraint.advance(self.tokenizer.token_bytes[tok])
        s.emit(self._scored(s, tok, logits) if s.logprobs is not None and logits is not None else Token(tok))

    @staticmethod
    def _scored(s: Sequence_, tok: int, logits: torch.Tensor) -> Token:
        """Token `tok` with its log-prob under `logits` [V] and the top s.logprobs alternatives."""
        lp = torch.log_softmax(logits.float(), -1)
        event = Token(tok, float(lp[tok]))
        if s.logprobs > 0:
            vals, ids = torch.topk(lp, s.logprobs)
            event.top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        return event

    def _penalised(self, s: Sequence_, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = s.sampling
        out = torch.tensor(s.generated, dtype=torch.long)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            seen = torch.cat([torch.tensor(s.prompt, dtype=torch.long), out])
            logits = apply_penalties(logits, seen, out, p)
        return apply_logit_bias(logits, p), out

    def _sample(self, s: Sequence_, logits: torch.Tensor) -> int:
        p = s.sampling
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(s.generated, dtype=torch.long)
            return sample(logits, p, s.generator, torch.cat([torch.tensor(s.prompt, dtype=torch.long), out]), out)
        return sample(logits, p, s.generator)

    # --- constrained decoding ---
    def _allowed(self, s: Sequence_, tok: int) -> bool:
        c = s.constraint
        if tok in s.stop_ids:
            return c.can_end()
        if tok in self.tokenizer.special_ids and not getattr(c, "free", False):  # a lazy grammar between its parts
            return False
        out = c.try_bytes(self.tokenizer.token_bytes[tok])
        if out is None:
            return False
        room = s.max_tokens - len(s.generated) - 1  # tokens left after this one
        return out[0] == () or len(c.completion(out[0])) <= room

    def _sample_constrained(self, s: Sequence_, logits: torch.Tensor) -> int:
        """A token the grammar allows: greedy takes the best allowed; sampling draws from the allowed
        part of the distribution (rejection sampling: draw, refuse a disallowed token, draw again)."""
        logits, _ = self._penalised(s, logits.float())
        if s.sampling.greedy:
            order = torch.argsort(logits, descending=True)
        else:
            probs = filter_logits(logits, s.sampling).softmax(-1)
            for _ in range(32):
                if float(probs.sum()) <= 0:
                    break
                tok = draw(probs, s.generator)
                if self._allowed(s, tok):
                    return tok
                probs[tok] = 0.0
            order = torch.argsort(logits, descending=True)
        for tok in order.tolist():
            if self._allowed(s, tok):
                return tok
        raise RuntimeError("no token continues the JSON")  # unreachable: every single byte is a token

    def _forced_completion(self, s: Sequence_) -> list[int] | None:
        """When the budget leaves exactly room for the shortest completion, the tokens of it; else None."""
        room = s.max_tokens - len(s.generated)
        if s.constraint.can_end() and room > 1:
            return None
        text = s.constraint.completion()
        if room > len(text) or not text:
            return None
        return self.tokens_for(text)

    def tokens_for(self, data: bytes) -> list[int]:
        """Greedy longest-match tokens whose bytes join to exactly `data`."""
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._max_token_len, len(data) - i), 0, -1):
                tok = self._bytes_to_id.get(data[i:i + n])
                if tok is not None:
                    out.append(tok)
                    i += n
                    break
            else:
                raise RuntimeError(f"no token for byte {data[i]:#x}")
        return out


def _ignore(event) -> None:
    """A fill's emit: nobody listens."""


def _adapter_selector(model: torch.nn.Module):
    """set_adapter_per_row when the model carries LoRA adapters, else None."""
    if getattr(model, "lora_state", None) is None:
        return None
    from ..train.lora import set_adapter_per_row

    return set_adapter_per_row


def make_sequence(prompt: Sequence[int], max_tokens: int, emit: Callable[[Token | Finish], None], **kw) -> Sequence_:
    """A Sequence_ ready for Engine.submit."""
    return Sequence_(list(prompt), max_tokens, emit, **kw)
