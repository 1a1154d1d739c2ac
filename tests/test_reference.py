"""The default model against an independent implementation (transformers, float32): ../shared/fixtures."""

from __future__ import annotations

import pytest
import torch

from camelid.chat import encode_chat, render, template_for
from camelid.generate import Request, generate, generate_one


def test_token_ids_match_reference(llm, reference):
    for case in reference["tokenize"]:
        assert llm.tokenizer.encode(case["text"], special=True) == case["ids"], case["text"]
        assert llm.tokenizer.encode(case["text"]) == case["ids_no_special"], case["text"]
        assert llm.tokenizer.decode(case["ids_no_special"]) == case["text"]


def test_logits_match_reference(llm, reference):
    for case in reference["logits"]:
        with torch.inference_mode():
            logits = llm.model(torch.tensor([case["prompt_ids"]]))[0]
        top = logits[-1].topk(10)
        assert top.indices.tolist() == case["last_top10_ids"]
        assert torch.allclose(top.values, torch.tensor(case["last_top10_logits"]), atol=1e-2)
        assert logits.argmax(-1).tolist() == case["argmax_every_position"]
        assert abs(logits[-1].logsumexp(-1).item() - case["logsumexp_last"]) < 1e-2


def test_greedy_continuations_match_reference(llm, reference):
    for case in reference["greedy"]:
        assert llm.tokenizer.encode(case["prompt"], bos=True) == case["prompt_ids"]
        request = Request(case["prompt_ids"], 32, stop_ids=llm.tokenizer.stop_ids)
        ids = list(generate_one(llm.model, request))
        assert ids == case["new_ids"], case["prompt"]
        assert llm.tokenizer.decode(ids, special=True, start_of_sequence=False) == case["text"]


def test_batch_of_different_lengths_equals_one_at_a_time(llm, reference):
    cases = reference["greedy"]
    requests = [Request(c["prompt_ids"], 32, stop_ids=llm.tokenizer.stop_ids) for c in cases]
    assert len({len(c["prompt_ids"]) for c in cases}) > 1
    rows: list[list[int]] = [[] for _ in cases]
    for step in generate(llm.model, requests):
        for row, tok in zip(rows, step):
            if tok is not None:
                row.append(tok)
    assert rows == [c["new_ids"] for c in cases]


def test_chat_render_matches_reference(llm, reference):
    case = reference["chat_render"]
    source, origin = template_for(llm.tokenizer)
    assert origin == "model"
    assert render(source, case["messages"], llm.tokenizer) == case["text"]
    assert encode_chat(llm.tokenizer, case["messages"]) == llm.tokenizer.encode(case["text"], special=True)


def test_api_generate_and_chat(llm):
    from camelid import SamplingParams

    greedy = SamplingParams(temperature=0)
    assert llm.generate("The capital of France is", max_tokens=3, sampling=greedy) == " Paris.\n"
    assert "Paris" in llm.chat("What is the capital of France?", max_tokens=20, sampling=greedy)
    pieces = list(llm.chat_stream("What is the capital of France?", max_tokens=20, sampling=greedy))
    assert len(pieces) > 1 and "Paris" in "".join(pieces)
    done = llm.start(llm.encode_prompt("The capital of France is"), max_tokens=40, sampling=greedy).run()
    assert done.finish_reason == "stop" and done.token_ids[-1] == 2  # <|im_end|>, as in the reference


@pytest.mark.parametrize("max_tokens", [0, 1, 5])
def test_max_tokens_is_respected(llm, max_tokens):
    from camelid import SamplingParams

    done = llm.start(llm.encode_prompt("Once upon a time"), max_tokens=max_tokens, sampling=SamplingParams(temperature=0)).run()
    assert len(done.token_ids) == max_tokens
    assert done.finish_reason == "length"
