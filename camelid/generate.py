"""Prefill + decode with a KV cache, as an iterator of token ids. No text here: consumers detokenize."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .compiled import step_for
from .errors import ContextLengthError, SamplingError
from .prompt_cache import PromptCache, next_chunk
from .sampling import GREEDY, SamplingParams, sample


@dataclass
class Request:
    """One sequence to continue: prompt ids, how many tokens at most, how to sample, when to stop."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    stop_ids: frozenset[int] = frozenset()
    cached: int = 0  # set by prefill: prompt tokens restored from the prompt cache


def check_fits(prompt_len: int, context: int) -> None:
    if prompt_len == 0:
        raise ContextLengthError("the prompt is empty: give at least one token")
    if prompt_len >= context:
        raise ContextLengthError(f"the prompt is {prompt_len} tokens; the context window is {context}, leaving no room to generate")


def active_adapter(model: torch.nn.Module) -> str | None:
    """The adapter the model runs with for every row (camelid/train/lora.py's state; None: the base alone), which
    keys its prompt-cache chunks: toggling an adapter on a loaded model never meets the other's KV."""
    state = getattr(model, "lora_state", None)
    return state.active if state is not None else None


@torch.inference_mode()
def prefill(model: torch.nn.Module, cache: KVCache, prompts: Sequence[Sequence[int]],
            prompt_cache: PromptCache | None = None) -> tuple[torch.Tensor, list[int]]:
    """Run each prompt into its row of the cache: (logits of each row's last token [B,V], tokens restored per row).

    Row by row, in the chunks of camelid/prompt_cache.py's schedule (the prompt cache's, the default without one;
    the same chunks the server's engine prefills): a row's
    work (and its numbers) is the same alone or in a batch, with the prompt cache or without, and no compute
    goes to padding. With a prompt cache, the longest cached chain of chunks is copied in and every whole
    chunk computed is kept."""
    device = model.device
    last = torch.empty(len(prompts), model.config.vocab_size, device=device)
    restored = []
    adapter = active_adapter(model)
    for b, prompt in enumerate(prompts):
        prompt = list(prompt)
        row = cache.view(b, b + 1)
        start, key = prompt_cache.restore(cache, b, prompt, adapter) if prompt_cache is not None else (0, b"")
        restored.append(start)
        tokens = torch.as_tensor(prompt, dtype=torch.long, device=device)[None]
        while start < len(prompt):
            end = prompt_cache.next_chunk(start, len(prompt)) if prompt_cache is not None else next_chunk(start, len(prompt))
            positions = torch.arange(start, end, device=device)[None]
            logits = model(tokens[:, start:end], positions, row, logits_at=torch.tensor([end - start - 1], device=device))
            if prompt_cache is not None:
                key = prompt_cache.save(cache, b, prompt, start, end, key, adapter)
            start = end
        last[b] = logits[0, 0]
    return last, restored


@torch.inference_mode()
def generate(model: torch.nn.Module, requests: Sequence[Request],
             prompt_cache: PromptCache | None = None) -> Iterator[list[int | None]]:
    """Continue every request together. Each step yields one new id per row, or None for a finished row.

    prompt_cache: reuse the KV of earlier prompts' chunks (exact: the output is the same without it); each
    request's `cached` is set to the prompt tokens it restored. Where the cache is `granular` and decoding runs
    eagerly, the replies are kept too, so the next turn of a chat reuses them.

    A row ends at one of its stop ids (which is yielded) or after max_tokens. Rows of different
    prompt lengths give the same greedy tokens as they would alone.
    """
    if not requests:
        return
    context = model.config.max_seq_len
    for r in requests:
        check_fits(len(r.prompt), context)
        if r.max_tokens < 0:
            raise SamplingError(f"max_tokens must be >= 0, got {r.max_tokens}")
    budgets = [min(r.max_tokens, context - len(r.prompt)) for r in requests]
    if max(budgets) == 0:
        return
    span = max(len(r.prompt) + n for r, n in zip(requests, budgets))
    cache = KVCache.for_model(model, len(requests), span)
    device = model.device

    generators = [r.sampling.generator() for r in requests]
    seen = [torch.as_tensor(list(r.prompt), dtype=torch.long) for r in requests]
    generated: list[list[int]] = [[] for _ in requests]
    positions = torch.tensor([len(r.prompt) for r in requests], device=device)
    done = [n == 0 for n in budgets]

    logits, restored = prefill(model, cache, [r.prompt for r in requests], prompt_cache)
    for r, n in zip(requests, restored, strict=True):
        r.cached = n
    step_fn = step_for(model)  # the compiled decode step when one is built for this model (camelid compile)
    while True:
        step: list[int | None] = []
        for b, r in enumerate(requests):
            if done[b]:
                step.append(None)
                continue
            out = torch.as_tensor(generated[b], dtype=torch.long)
            tok = sample(logits[b].cpu(), r.sampling, generators[b], torch.cat([seen[b], out]), out)
            generated[b].append(tok)
            step.append(tok)
            if tok in r.stop_ids or len(generated[b]) >= budgets[b]:
                done[b] = True
        if all(done) and prompt_cache is not None and step_fn is None:  # before the last yield: a caller stops there
            for b, r in enumerate(requests):  # eager decoding computed the replies as prefill would (but the last
                prompt_cache.keep(cache, b, [*r.prompt, *generated[b][:-1]], len(r.prompt),  # token, never fed)
                                  adapter=active_adapter(model))
        yield step
        if all(done):
            return
        tokens = torch.tensor([[s if s is not None else 0] for s in step], device=device)
        logits = step_fn(tokens, positions[:, None], cache) if step_fn else model(tokens, positions[:, None], cache)[:, -1]
        positions = positions + 1


def generate_one(model: torch.nn.Module, request: Request, prompt_cache: PromptCache | None = None) -> Iterator[int]:
    """The new ids of a single request, as they come."""
    for step in generate(model, [request], prompt_cache):
        if step[0] is not None:
            yield step[0]
