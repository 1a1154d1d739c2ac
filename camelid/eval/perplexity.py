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
