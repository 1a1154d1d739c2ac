"""Speculative decoding (camelid/speculate.py): greedy output identical to plain decoding with either drafter, the
sampling rule keeps the model's distribution, and the CLI's --speculate."""

from __future__ import annotations

import pytest
import torch
from conftest import camelid_cli, one_line_error
from gguf import GGMLQuantizationType as G
from gguf_factory import Spec, byte_level_vocab, write_gguf

from camelid.formats import read
from camelid.generate import Request, generate_one
from camelid.loader import build_model
from camelid.sampling import GREEDY, SamplingParams
from camelid.speculate import ModelDrafter, NgramDrafter, accept_or_resample, generate_speculative

SPEC = Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    write_gguf(d / "target.gguf", SPEC, byte_level_vocab(), G.Q4_1, seed=0)
    write_gguf(d / "draft.gguf", SPEC, byte_level_vocab(), G.Q8_0, seed=0)  # the same weights, another grid
    write_gguf(d / "other.gguf", SPEC, byte_level_vocab(), G.Q4_0, seed=5)  # unrelated weights: most drafts rejected
    return d


def _model(path):
    return build_model(read(path), quant="auto")


# a prompt that repeats itself, so n-gram drafts exist and are often right
PROMPT = [5, 9, 14, 3, 8, 22, 40, 5, 9, 14, 3, 8, 22, 40, 5, 9, 14]


@pytest.mark.parametrize("drafter", ["ngram", "same", "quantized-copy", "unrelated"])
def test_greedy_output_is_identical_to_plain_decoding(tiny, drafter):
    model = _model(tiny / "target.gguf")
    d = {"ngram": lambda: NgramDrafter(), "same": lambda: ModelDrafter(model),
         "quantized-copy": lambda: ModelDrafter(_model(tiny / "draft.gguf")),
         "unrelated": lambda: ModelDrafter(_model(tiny / "other.gguf"))}[drafter]()
    for prompt, n in [(PROMPT, 40), ([7, 1], 30), (PROMPT[:5], 1)]:
        req = Request(prompt, n, GREEDY, frozenset())
        assert list(generate_speculative(model, req, d)) == list(generate_one(model, req))


def test_greedy_with_penalties_and_a_stop_id_is_identical(tiny):
    model = _model(tiny / "target.gguf")
    plain = list(generate_one(model, Request(PROMPT, 40, SamplingParams(temperature=0, repetition_penalty=1.3), frozenset())))
    stop = frozenset({plain[12]})
    for params, stops in [(SamplingParams(temperature=0, repetition_penalty=1.3), frozenset()), (GREEDY, stop)]:
        req = Request(PROMPT, 40, params, stops)
        assert list(generate_speculative(model, req, NgramDrafter())) == list(generate_one(model, req))


@pytest.mark.parametrize("one_hot", [False, True])
def test_the_acceptance_rule_keeps_the_model_distribution(one_hot):
    """Draw d ~ q, apply the rule: the tokens come out distributed as p (20000 draws, within 0.015 each)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(20000):
        if one_hot:  # an n-gram draft: always token 2
            tok, _ = accept_or_resample(p, None, 2, gen)
        else:
            tok, _ = accept_or_resample(p, q, int(torch.multinomial(q, 1, generator=gen)), gen)
        counts[tok] += 1
    assert (counts / counts.sum() - p).abs().max() < 0.015, counts / counts.sum()


def test_sampled_speculation_runs_and_is_seeded(tiny):
    model = _model(tiny / "target.gguf")
    params = SamplingParams(temperature=0.8, top_k=20, seed=3)
    req = Request(PROMPT, 30, params, frozenset())
    a = list(generate_speculative(model, req, ModelDrafter(_model(tiny / "draft.gguf"))))
    b = list(generate_speculative(model, req, ModelDrafter(_model(tiny / "draft.gguf"))))
    assert a == b and len(a) == 30


def test_cli_speculate(tiny):
    path = str(tiny / "target.gguf")
    args = ["run", path, "abcabcabcabc", "--raw", "--max-tokens", "24", "--temperature", "0"]
    plain = camelid_cli(*args)
    assert plain.returncode == 0, plain.stderr
    for spec in ("ngram", str(tiny / "draft.gguf")):
        r = camelid_cli(*args, "--speculate", spec)
        assert r.returncode == 0, r.stderr
        assert r.stdout == plain.stdout
    bad = camelid_cli(*args, "--speculate", str(tiny / "missing.gguf"))
    assert "missing.gguf" in one_line_error(bad)
