"""The continuous-batching engine in process: greedy tokens match the reference alone and beside others."""

from __future__ import annotations

import pytest
from conftest import Collector

from camelid.serve.engine import Engine, QueueFullError, make_sequence


@pytest.fixture(scope="module")
def engine(llm):
    eng = Engine(llm.model, llm.tokenizer, max_concurrency=4, max_seq_len=1024, max_queue=2, prefill_chunk=64)
    eng.start()
    yield eng
    eng.stop()


def run(engine, prompts, max_tokens, stop_ids):
    outs = []
    for p, n in zip(prompts, max_tokens, strict=True):
        c = Collector()
        engine.submit(make_sequence(p, n, c, stop_ids=stop_ids))
        outs.append(c)
    for c in outs:
        assert c.done.wait(120), "the engine did not finish"
    return outs


def test_greedy_matches_reference_beside_others_and_long_prefill(engine, reference, llm):
    cases = reference["greedy"]
    # a long prompt prefilled in chunks of 64 while the reference prompts decode beside it
    long_prompt = llm.tokenizer.encode("The history of the river. " * 60, bos=True)
    prompts = [c["prompt_ids"] for c in cases] + [long_prompt]
    budgets = [len(c["new_ids"]) for c in cases] + [8]
    outs = run(engine, prompts, budgets, llm.tokenizer.stop_ids)
    for case, out in zip(cases, outs, strict=False):
        assert out.ids == case["new_ids"], case["prompt"]
    # the long prompt's output equals the same request alone
    alone = run(engine, [long_prompt], [8], llm.tokenizer.stop_ids)[0]
    assert alone.ids == outs[-1].ids and len(alone.ids) == 8
    assert engine.active == 0


def test_queue_bound_and_cancel_frees_slot(engine, llm):
    prompt = llm.tokenizer.encode("Count to one hundred:", bos=True)
    held = [Collector() for _ in range(6)]  # 4 slots + 2 queued
    seqs = [make_sequence(prompt, 500, c) for c in held]
    for s in seqs:
        engine.submit(s)
    with pytest.raises(QueueFullError):
        engine.submit(make_sequence(prompt, 5, Collector()))
    for s in seqs:
        engine.cancel(s)
    for c in held:
        assert c.done.wait(30) and c.finish.reason == "cancelled"
    assert engine.active == 0 and engine.queued == 0
    assert all(len(c.ids) < 500 for c in held)


def test_fast_path_greedy_is_the_same_alone_and_beside_others(default_model_path, reference, llm):
    """The server's default (quantized weights, bf16): each request's greedy tokens do not depend on its neighbours."""
    import camelid

    fast = camelid.load(default_model_path)  # quant="auto"
    eng = Engine(fast.model, fast.tokenizer, max_concurrency=4, max_seq_len=1024, max_queue=4, prefill_chunk=64)
    eng.start()
    try:
        cases = reference["greedy"][:4]
        prompts = [c["prompt_ids"] for c in cases]
        together = run(eng, prompts, [16] * len(prompts), fast.tokenizer.stop_ids)
        for prompt, out in zip(prompts, together):
            alone = run(eng, [prompt], [16], fast.tokenizer.stop_ids)[0]
            assert alone.ids == out.ids
    finally:
        eng.stop()


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_speculation_gives_plain_decodings_tokens_alone_and_beside_others(path, default_model_path, llm):
    """Prompt lookup in the engine: a row decoding alone verifies its drafts in one forward and emits exactly the
    tokens plain decoding gives; beside another decoding row it decodes plainly, with the same tokens again."""
    import camelid

    model = camelid.load(default_model_path) if path == "fast" else llm
    eng = Engine(model.model, model.tokenizer, max_concurrency=2, max_seq_len=512, prefill_chunk=64)
    eng.start()
    try:
        text = "Copy the list exactly.\nred apple, green pear, yellow lemon, red apple, green pear, yellow lemon, red"
        prompt = model.tokenizer.encode(text, bos=True)
        stop = model.tokenizer.stop_ids

        def one(speculate: str, n: int = 1) -> list[list[int]]:
            outs = [Collector() for _ in range(n)]
            for c in outs:
                eng.submit(make_sequence(prompt, 24, c, stop_ids=stop, speculate=speculate))
            for c in outs:
                assert c.done.wait(300), "the engine did not finish"
            return [c.ids for c in outs]

        plain = one("none")[0]
        assert eng.drafted_tokens == 0
        fast = one("ngram")[0]
        assert fast == plain and len(plain) == 24
        assert eng.drafted_tokens > 0 and 0 < eng.accepted_tokens <= eng.drafted_tokens  # the repeats were drafted
        assert one("ngram", n=2) == [plain, plain]  # two rows decoding: plain steps, the same tokens
    finally:
        eng.stop()


def test_speculate_request_field_is_checked():
    from camelid.serve.params import ApiError, Limits, parse_common

    limits = Limits(max_seq_len=512, max_tokens=512, max_n=1, max_body_bytes=1 << 20, speculate="ngram")
    assert parse_common({"prompt": "x"}, limits, chat=False).speculate == "ngram"  # the server's default
    assert parse_common({"prompt": "x", "speculate": "none"}, limits, chat=False).speculate == "none"
    with pytest.raises(ApiError) as e:
        parse_common({"prompt": "x", "speculate": "draft.gguf"}, limits, chat=False)
    assert e.value.status == 400 and e.value.param == "speculate"
