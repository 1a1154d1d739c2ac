"""Perplexity: the windowed, cached computation equals a direct full-sequence one."""

from __future__ import annotations

import math

import pytest
import torch

from camelid.eval.perplexity import perplexity

TEXT = "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean cultures."


def direct_nll(model, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return [-logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_single_window_equals_direct(llm):
    ids = llm.tokenizer.encode(TEXT, bos=True)
    r = perplexity(llm.model, ids)
    nll = direct_nll(llm.model, ids)
    assert r.tokens == len(ids) and r.scored == len(ids) - 1 and r.windows == 1
    assert r.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_windows_overlap_by_half_and_score_each_token_once(llm):
    ids = llm.tokenizer.encode(TEXT, bos=True)
    window = 8
    r = perplexity(llm.model, ids, window=window)
    # reference: token t is scored in the window that starts at the last multiple of window/2 with t inside it
    expected, next_unscored, start = [], 1, 0
    while next_unscored < len(ids):
        chunk = ids[start : start + window]
        nll = direct_nll(llm.model, chunk)
        expected += [nll[i - 1] for i in range(1, len(chunk)) if start + i >= next_unscored]
        next_unscored = start + len(chunk)
        start += window // 2
    assert r.scored == len(expected) == len(ids) - 1
    assert r.perplexity == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-4)
    assert r.perplexity > perplexity(llm.model, ids).perplexity  # less context, worse prediction
