"""Speculative decoding: a cheap drafter proposes tokens, the model checks them all in one forward.

Drafters (`--speculate ngram` / `--speculate MODEL`):
  NgramDrafter  prompt lookup decoding: the tokens that followed the latest earlier occurrence of the sequence's
                last n tokens (n = 3, then 2), up to k of them. Pays off where the output copies its input
                (editing, summarising, code); where nothing matches, the step is a plain decode step.
  ModelDrafter  a smaller model sharing the vocabulary, run ahead k tokens on its own KV cache.

Verification feeds [last, d1 .. dk] at their positions with the cache's `query_by_query` set: every query is
attended as plain decoding attends it alone and the quantized products are row-independent, so the logits are
bit-equal to plain decoding's and greedy output is identical (tested). Sampling uses the standard rule (Leviathan
et al. 2023, Chen et al. 2023): accept d_j with probability min(1, p(d_j) / q(d_j)) (q: the drafter's distribution,
one-hot for n-grams), otherwise draw from max(p - q, 0) renormalised and stop; when all are accepted, one more token
from p. The output has the model's own distribution. Generation still yields token ids, one at a time.

Verification runs on the eager model. Where a compiled decode step is attached (`camelid compile`), every step
decodes through it instead and speculation stands aside: mixing the compiled step's logits with eager ones would
break the identical-output guarantee, and on the 2-core AVX2 EPYC the compiled step alone is 2.1x eager decode
(bench/results/decode-epyc-avx2.txt), more than prompt lookup's best case there (1.97x, an edit that copies its input).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache
from .compiled import step_for
from .errors import CamelidError, SamplingError
from .generate import Request, check_fits, prefill
from .sampling import SamplingParams, draw, probabilities, sample

DRAFT_TOKENS = 6  # tokens proposed per step at most


class DraftLength:
    """How many tokens to draft next step. Verifying k drafts costs more than a plain step (on a 2-core AVX2 EPYC,
    eager: 1 token 43 ms, 2 48 ms, 4 52 ms, 7 83 ms), so a refused draft loses time: after a draft kept whole the
    length grows by 2, after one refused it falls to one more than was kept, and after two drafts in a row with
    nothing kept no draft is made for the next PAUSE steps (text that does not repeat itself costs little)."""

    PAUSE = 4

    def __init__(self, most: int = DRAFT_TOKENS) -> None:
        self.most, self.k, self.misses, self.paused = most, most, 0, 0

    def next(self, room: int) -> int:
        """The tokens to draft now (0: decode plainly this step), at most room."""
        if self.paused:
            self.paused -= 1
            return 0
        return max(0, min(self.k, room))

    def update(self, drafted: int, kept: int) -> None:
        if drafted == 0:
            return
        if kept == drafted:
            self.k, self.misses = min(self.most, self.k + 2), 0
            return
        self.k = max(1, min(self.k - 1, kept + 1))
        self.misses = self.misses + 1 if kept == 0 else 0
        if self.misses >= 2:
            self.paused, self.misses = self.PAUSE, 0


class NgramDrafter:
    """Prompt lookup: continue the latest earlier occurrence of the last n tokens."""

    def __init__(self, ngram: Sequence[int] = (3, 2), k: int = DRAFT_TOKENS) -> None:
        self.ngram, self.k = tuple(ngram), k

    def reset(self, capacity: int) -> None:
        pass

    def propose(self, seq: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], list | None]:
        """Up to k draft tokens after seq, and their distributions (None: each is certain, a one-hot q)."""
        k = min(k, self.k)
        for n in self.ngram:
            if len(seq) <= n or k <= 0:
                continue
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # latest first; the match must be followed by something
                if seq[i : i + n] == tail:
                    return seq[i + n : i + n + k], None
        return [], None


class ModelDrafter:
    """A smaller model with the same vocabulary, greedy when the request is greedy, else sampled from q."""

    def __init__(self, model: torch.nn.Module, k: int = DRAFT_TOKENS) -> None:
        self.model, self.k = model, k
        self.cache: KVCache | None = None
        self.fed: list[int] = []  # tokens whose keys and values are in the draft's cache, in order

    def reset(self, capacity: int) -> None:
        self.cache, self.fed = KVCache.for_model(self.model, 1, capacity), []

    @torch.inference_mode()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        start = len(self.fed)
        t = torch.tensor([tokens], device=self.model.device)
        pos = torch.arange(start, start + len(tokens), device=self.model.device)[None]
        logits = self.model(t, pos, self.cache, logits_at=torch.tensor([len(tokens) - 1], device=self.model.device))
        self.fed += tokens
        return logits[0, -1].float().cpu()

    def propose(self, seq: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], list | None]:
        k = min(k, self.k)
        if k <= 0:
            return [], None
        common = 0  # the draft's cache is valid up to the first token where it and seq part
        for a, b in zip(self.fed, seq):
            if a != b:
                break
            common += 1
        common = min(common, len(seq) - 1)  # feed at least the last token: its logits give the first draft
        self.fed = self.fed[:common]
        logits = self._feed(seq[common:])
        drafts, dists = [], []
        for j in range(k):
            if params.greedy:
                tok = int(logits.argmax())
            else:
                q = probabilities(logits, params)
                tok = draw(q, generator)
                dists.append(q)
            drafts.append(tok)
            if j < k - 1:
                logits = self._feed([tok])
        return drafts, (None if params.greedy else dists)


def make_drafter(spec: str | None, model: torch.nn.Module, load_model=None):
    """The drafter for `--speculate SPEC`: None, "ngram", or a draft model by store name or path (loaded by load_model,
    checked to share the model's vocabulary)."""
    if spec is None or spec == "" or spec == "none":
        return None
    if spec == "ngram":
        return NgramDrafter()
    if load_model is None:
        raise CamelidError(f"--speculate {spec}: draft models are not available here (use ngram)")
    draft = load_model(spec)
    if draft.config.vocab_size != model.config.vocab_size:
        raise CamelidError(f"--speculate {spec}: the draft's vocabulary ({draft.config.vocab_size} tokens) is not the "
                           f"model's ({model.config.vocab_size})")
    return ModelDrafter(draft)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor | None, d: int, generator=None) -> tuple[int, bool]:
    """Speculative sampling's rule for a draft d drawn from q (None: q is one-hot at d) where the model's distribution
    is p: (d, True) with probability min(1, p(d) / q(d)), else (a token from max(p - q, 0) renormalised, False).
    Over d ~ q and this rule, the token returned has distribution p."""
    ratio = float(p[d]) / (float(q[d]) if q is not None else 1.0)
    if float(torch.rand(1, generator=generator)) < ratio:
        return d, True
    rest = (p - q).clamp(min=0) if q is not None else p.clone().index_fill_(0, torch.tensor([d]), 0.0)
    total = float(rest.sum())
    if total <= 0:  # p == q up to rounding: any draw from p is right
        return draw(p, generator), False
    return draw(rest, generator), False


@torch.inference_mode()
def generate_speculative(model: torch.nn.Module, request: Request, drafter) -> Iterator[int]:
    """The new ids of one request, as plain decoding would give them (greedy: the same ids; sampling: the same
    distribution), a few per model forward where the drafts are accepted."""
    context = model.config.max_seq_len
    check_fits(len(request.prompt), context)
    if request.max_tokens < 0:
        raise SamplingError(f"max_tokens must be >= 0, got {request.max_tokens}")
    budget = min(request.max_tokens, context - len(request.prompt))
    if budget == 0:
        return
    params, gen = request.sampling, request.sampling.generator()
    capacity = len(request.prompt) + budget
    cache = KVCache.for_model(model, 1, capacity)
    drafter.reset(capacity)
    seq, out = list(request.prompt), []
    length = DraftLength(getattr(drafter, "k", DRAFT_TOKENS))
    prompt_ids = torch.as_tensor(seq, dtype=torch.long)

    def pick(logits: torch.Tensor) -> int:  # plain decoding's choice, with its penalties
        done = torch.as_tensor(out, dtype=torch.long)
        return sample(logits, params, gen, torch.cat([prompt_ids, done]), done)

    def dist(logits: torch.Tensor) -> torch.Tensor:
        done = torch.as_tensor(out, dtype=torch.long)
        return probabilities(logits, params, torch.cat([prompt_ids, done]), done)

    logits = prefill(model, cache, [seq])[0][0].cpu()  # (logits [B,V], restored): row 0
    tok = pick(logits)
    while True:
        out.append(tok)
        seq.append(tok)
        yield tok
        remaining = budget - len(out)
        if tok in request.stop_ids or remaining <= 0:
            return
        step_fn = step_for(model)  # a compiled decode step (it may arrive mid-request): plain steps through it
        k = length.next(remaining - 1) if step_fn is None else 0
        drafts, q = drafter.propose(seq, k, params, gen) if k else ([], None)
        tokens = [tok] + drafts
        start = len(seq) - 1
        positions = torch.arange(start, start + len(tokens), device=model.device)[None]
        if step_fn is not None:
            logits = step_fn(torch.tensor([tokens], device=model.device), positions, cache).float().cpu()  # [1, V]
        else:
            cache.query_by_query = True
            logits = model(torch.tensor([tokens], device=model.device), positions, cache).float().cpu()[0]  # [T, V]
            cache.query_by_query = False
        kept = 0
        for j, d in enumerate(drafts):
            if params.greedy:
                tok = pick(logits[j])
                if tok != d:
                    break
            else:
                tok, accepted = accept_or_resample(dist(logits[j]), q[j] if q is not None else None, d, gen)
                if not accepted:
                    break
            # accepted: emit d and go on with the next draft
            kept += 1
            out.append(tok)
            seq.append(tok)
            yield tok
            if tok in request.stop_ids or len(out) >= budget:
                return
        else:  # every draft accepted (or none proposed): one more token from the last position
            tok = pick(logits[len(drafts)])
        length.update(len(drafts), kept)
