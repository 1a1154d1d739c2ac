"""Perplexity of a text as one token sequence, in windows of the context length when longer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..cache import KVCache

CHUNK = 512  # tokens per forward pass inside a window: bounds the logits held at once


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens in the sequence (BOS included when the model uses one)
    scored: int  # tokens predicted (every token after the first)
    windows: int
    stderr: float | None = None  # of the perplexity, as llama-perplexity prints it after "+/-" (chunked mode)


def scored_logits(model: torch.nn.Module, ids: Sequence[int], window: int | None = None
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(window index, logits [c,V], target ids [c]) for every token after the first, each scored once, in order.

    A sequence longer than `window` (default: the context length) is cut into windows that overlap by
    half, so every scored token sees at least half a window of context. Run under inference_mode.
    """
    window = min(window or model.config.max_seq_len, model.config.max_seq_len)
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    if window < 2:
        raise ValueError("the window must hold at least two tokens")
    device = model.device
    tokens = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    n = len(tokens)
    stride = window // 2 if n > window else window
    windows = 0
    next_unscored = 1  # index of the first token not yet scored
    start = 0
    while next_unscored < n:
        end = min(start + window, n)
        cache = KVCache.for_model(model, 1, end - start)
        seq = tokens[start:end]
        for c0 in range(0, len(seq), CHUNK):
            c1 = min(c0 + CHUNK, len(seq))
            pos = torch.arange(c0, c1, device=device)[None]
            logits = model(seq[None, c0:c1], pos, cache)[0]  # [c,V]
            # logits at window index i predict token i+1; score only tokens not scored yet
            targets = torch.arange(c0 + 1, c1 + 1, device=device)
            keep = (targets < len(seq)) & (targets + start >= next_unscored)
            if int(keep.sum()):
                yield windows, logits[keep], seq[targets[keep]]
        windows += 1
        next_unscored = end
        start += stride


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: Sequence[int], window: int | None = None,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """exp(mean NLL) over every token after the first, in windows as `scored_logits` cuts them."""
    total_nll, scored, windows = 0.0, 0, 0
    for w, logits, targets in scored_logits(model, ids, window):
        logp = torch.log_softmax(logits.float(), dim=-1)
        total_nll -= logp.gather(1, targets[:, None]).sum().item()
        scored += len(targets)
        windows = w + 1
        if progress:
            progress(len(targets))
    nll = total_nll / scored
    return PerplexityResult(math.exp(nll), nll, len(ids), scored, windows)


@torch.inference_mode()
def chunked_perplexity(model: torch.nn.Module, ids: Sequence[int], n_ctx: int = 512, max_chunks: int | None = None,
                       bos_id: int | None = None, progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity as llama.cpp's llama-perplexity computes it, so the two figures can stand side by side.

    The token list (BOS first when the model uses one, as llama.cpp tokenizes) is cut into non-overlapping chunks
    of n_ctx tokens; a tail shorter than a chunk is dropped. Each chunk is a fresh context whose first token is
    replaced by BOS (when `bos_id` is given: the model adds BOS), and only its second half is scored: the logits at
    positions n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1 (n_ctx - 1 - n_ctx/2 tokens per chunk).
    Like llama.cpp, it needs at least 2 * n_ctx tokens. `stderr` is llama.cpp's "+/-" figure.
    """
    if n_ctx < 4 or n_ctx > model.config.max_seq_len:
        raise ValueError(f"the chunk length must be in [4, {model.config.max_seq_len}] (the context length), got {n_ctx}")
    if len(ids) < 2 * n_ctx:
        raise ValueError(f"chunked perplexity needs at least 2 * {n_ctx} tokens (as llama-perplexity does); the text "
                         f"has {len(ids)}: give a longer text or a smaller --context")
    n_chunk = len(ids) // n_ctx
    if max_chunks is not None and max_chunks > 0:
        n_chunk = min(n_chunk, max_chunks)
    first = n_ctx // 2
    device = model.device
    nll = nll2 = 0.0
    count = 0
    for i in range(n_chunk):
        seq = torch.as_tensor(list(ids[i * n_ctx:(i + 1) * n_ctx]), dtype=torch.long, device=device)
        if bos_id is not None:
            seq[0] = bos_id
        cache = KVCache.for_model(model, 1, n_ctx)
        pieces = []
        for c0 in range(0, n_ctx, CHUNK):
            c1 = min(c0 + CHUNK, n_ctx)
            pos = torch.arange(c0, c1, device=device)[None]
            logits = model(seq[None, c0:c1], pos, cache)[0]  # [c,V]
            lo, hi = max(c0, first), min(c1, n_ctx - 1)  # rows of this piece that are scored
            if lo < hi:
                pieces.append(torch.log_softmax(logits[lo - c0:hi - c0].double(), dim=-1)
                              .gather(1, seq[lo + 1:hi + 1, None]).squeeze(1))
        token_nll = -torch.cat(pieces)
        nll += token_nll.sum().item()
        nll2 += (token_nll * token_nll).sum().item()
        count += len(token_nll)
        if progress:
            progress(1)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 else 0.0
    return PerplexityResult(ppl, mean, len(ids), count, n_chunk, stderr)
