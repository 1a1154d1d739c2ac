"""Speculation with a draft model in the server (camelid/serve/engine.py, --speculate MODEL): greedy rows give plain
decoding's tokens whatever the draft and the load, sampled rows keep plain sampling's distribution, and the flag's
and the request field's mistakes are one line or a 400."""

from __future__ import annotations

import pytest
import torch
from conftest import Collector, camelid_cli, one_line_error
from gguf import GGMLQuantizationType as G
from gguf_factory import Spec, byte_level_vocab, write_gguf

from camelid.errors import CamelidError
from camelid.formats import read
from camelid.loader import build_model
from camelid.sampling import SamplingParams, probabilities
from camelid.serve.engine import Engine, make_sequence

SPEC = Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=256)
PROMPT = [5, 9, 14, 3, 8, 22, 40, 5, 9, 14, 3, 8, 22, 40, 5, 9, 14]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec-serve")
    write_gguf(d / "target.gguf", SPEC, byte_level_vocab(), G.Q4_1, seed=0)
    write_gguf(d / "draft.gguf", SPEC, byte_level_vocab(), G.Q8_0, seed=0)  # the same weights, another grid
    write_gguf(d / "other.gguf", SPEC, byte_level_vocab(), G.Q4_0, seed=5)  # unrelated weights: most drafts rejected
    write_gguf(d / "vocab.gguf", SPEC, byte_level_vocab(("<|endoftext|>", "<|x|>")), G.Q8_0, seed=0)  # 258 tokens
    return d


def _model(path, quant="auto"):
    return build_model(read(path), quant=quant)


def _run(eng, prompt, n, **kw) -> list[int]:
    c = Collector()
    eng.submit(make_sequence(prompt, n, c, **kw))
    assert c.done.wait(120), "the engine did not finish"
    assert c.finish.reason in ("stop", "length"), c.finish
    return c.ids


@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("draft", ["quantized-copy", "unrelated"])
def test_greedy_rows_give_plain_tokens_with_a_draft_alone_and_beside_others(tiny, path, draft):
    model = _model(tiny / "target.gguf", "auto" if path == "fast" else None)
    eng = Engine(model, read(tiny / "target.gguf").tokenizer, max_concurrency=2, max_seq_len=200, prefill_chunk=64,
                 draft_model=_model(tiny / ("draft.gguf" if draft == "quantized-copy" else "other.gguf")))
    eng.start()
    try:
        for prompt, n in [(PROMPT, 60), ([7, 1], 30), (PROMPT[:5], 2)]:
            plain = _run(eng, prompt, n)
            assert _run(eng, prompt, n, speculate="draft") == plain
        assert eng.drafted_tokens > eng.accepted_tokens  # drafts refused
        assert eng.accepted_tokens > 0 or draft == "unrelated"  # and kept (the unrelated one's rarely are)
        # a long row that shares the engine for a while (plain steps), then is alone again: its draft catches up
        plain = _run(eng, PROMPT, 120)
        long, short = Collector(), Collector()
        eng.submit(make_sequence(PROMPT, 120, long, speculate="draft"))
        eng.submit(make_sequence([7, 1, 7], 20, short, speculate="draft"))
        assert long.done.wait(120) and short.done.wait(120)
        assert long.ids == plain and short.ids == _run(eng, [7, 1, 7], 20)
    finally:
        eng.stop()


def test_sampled_rows_keep_plain_samplings_distribution(tiny):
    """Sampled rows with a draft that is close to the model but not it (drafts kept and refused): the first two tokens'
    joint frequencies over 1200 seeded requests match the model's own p(t1) p(t2 | t1), computed directly (each cell within 0.05)."""
    model = _model(tiny / "target.gguf")
    eng = Engine(model, read(tiny / "target.gguf").tokenizer, max_concurrency=1, max_seq_len=64, prefill_chunk=64,
                 draft_model=_model(tiny / "draft.gguf"))
    params = SamplingParams(temperature=1.5, top_k=3)
    with torch.inference_mode():
        def dist(ids):
            return probabilities(model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1].float(), params)

        p1 = dist(PROMPT)
        exact = {(a, b): float(p1[a] * p2) for a in p1.nonzero().flatten().tolist()
                 for b, p2 in enumerate(dist(PROMPT + [a])) if p2 > 0}
    eng.start()
    try:
        counts: dict[tuple[int, int], int] = {}
        n = 1200
        for seed in range(n):
            ids = _run(eng, PROMPT, 3, sampling=SamplingParams(temperature=1.5, top_k=3, seed=seed), speculate="draft")
            counts[tuple(ids[:2])] = counts.get(tuple(ids[:2]), 0) + 1
        assert eng.drafted_tokens > eng.accepted_tokens > 0  # both branches of the rule were taken
        assert set(counts) <= set(exact)
        worst = max(abs(counts.get(k, 0) / n - p) for k, p in exact.items())
        assert worst < 0.05, (counts, exact)
        again = [_run(eng, PROMPT, 12, sampling=SamplingParams(temperature=0.8, seed=7), speculate="draft")
                 for _ in range(2)]
        assert again[0] == again[1] and len(again[0]) == 12  # seeded: the same tokens every time
    finally:
        eng.stop()


def test_request_field_names_the_draft():
    from camelid.serve.params import ApiError, Limits, parse_common

    limits = Limits(max_seq_len=512, max_tokens=512, max_n=1, speculate="draft", draft="small")
    assert parse_common({"prompt": "x"}, limits, chat=False).speculate == "draft"  # the server's default
    for value, want in [("small", "draft"), ("draft", "draft"), ("ngram", "ngram"), ("none", "none")]:
        assert parse_common({"prompt": "x", "speculate": value}, limits, chat=False).speculate == want
    with pytest.raises(ApiError) as e:
        parse_common({"prompt": "x", "speculate": "large"}, limits, chat=False)
    assert e.value.status == 400 and e.value.param == "speculate" and "'small'" in e.value.message
    plain = Limits(max_seq_len=512, max_tokens=512)
    with pytest.raises(ApiError) as e:
        parse_common({"prompt": "x", "speculate": "draft"}, plain, chat=False)
    assert "--speculate MODEL" in e.value.message


def test_the_server_loads_the_draft_and_checks_its_vocabulary(tiny, capsys):
    from camelid.serve import build_state, load_draft

    assert load_draft("ngram", "auto") == ("ngram", None)
    mode, draft = load_draft("small", "auto", {"small": str(tiny / "draft.gguf")})  # one of the served NAMEs
    assert mode == "draft" and draft[0] == "small"
    state = build_state(str(tiny / "target.gguf"), max_concurrency=1, max_seq_len=64, speculate=mode, draft=draft,
                        cache_mb=0)
    assert state.engine.draft_model is draft[1] and state.limits.draft == "small"
    with pytest.raises(CamelidError, match="^--speculate missing.gguf: "):
        load_draft("missing.gguf", "auto")
    odd = load_draft(str(tiny / "vocab.gguf"), "auto")[1]
    with pytest.raises(CamelidError, match="258 tokens .* 259"):
        build_state(str(tiny / "target.gguf"), max_seq_len=64, speculate="draft", draft=odd, cache_mb=0)
    # with several models, one that does not share the draft's vocabulary serves without it
    state = build_state(str(tiny / "target.gguf"), max_seq_len=64, speculate="draft", draft=odd, draft_optional=True,
                        cache_mb=0)
    assert state.engine.draft_model is None and state.limits.speculate == "none" and state.limits.draft is None
    assert "runs without it" in capsys.readouterr().err


def test_serve_flag_mistakes_are_one_line(tiny):
    r = camelid_cli("serve", str(tiny / "target.gguf"), "--speculate", str(tiny / "missing.gguf"), "--port", "1")
    assert "--speculate" in one_line_error(r)
    r = camelid_cli("serve", str(tiny / "target.gguf"), "--speculate", str(tiny / "vocab.gguf"), "--port", "1")
    assert "same vocabulary" in one_line_error(r)



def test_a_compiled_step_takes_every_step_and_speculation_stands_aside(tiny, monkeypatch):
    """With a compiled decode step attached (here a stand-in that counts its calls), run's and the server's
    speculating requests decode through it, one token a step, and give its tokens: compiled and eager logits are
    never mixed."""
    from camelid import compiled
    from camelid.generate import Request, generate_one
    from camelid.sampling import GREEDY
    from camelid.speculate import NgramDrafter, generate_speculative

    model = _model(tiny / "target.gguf")
    calls = []

    def step(tokens, positions, cache):
        calls.append(tokens.shape)
        return model(tokens, positions, cache)[:, -1]

    monkeypatch.setitem(compiled._STEPS, model, step)
    req = Request(PROMPT, 30, GREEDY, frozenset())
    plain = list(generate_one(model, req))
    assert len(calls) == 29
    calls.clear()
    assert list(generate_speculative(model, req, NgramDrafter())) == plain
    assert len(calls) == 29 and all(shape == (1, 1) for shape in calls)
    eng = Engine(model, read(tiny / "target.gguf").tokenizer, max_concurrency=1, max_seq_len=200, prefill_chunk=64)
    eng.start()
    try:
        assert _run(eng, PROMPT, 30, speculate="ngram") == plain and eng.drafted_tokens == 0
    finally:
        eng.stop()
