"""Sampling functions: invariants of each filter and penalty, reproducibility, validation."""

from __future__ import annotations

import pytest
import torch

from camelid.errors import SamplingError
from camelid.sampling import SamplingParams, apply_penalties, filter_logits, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0)) == 0


def test_top_k_keeps_k_best():
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1, top_k=2))) == {0, 1}


def test_top_p_keeps_smallest_prefix_covering_p():
    probs = LOGITS.softmax(-1)
    p = float(probs[0] + probs[1]) - 1e-4  # the first two cover p; the first alone does not
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1, top_p=p))) == {0, 1}
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1, top_p=1e-6))) == {0}


def test_min_p_drops_tokens_below_fraction_of_top():
    probs = LOGITS.softmax(-1)
    expected = {i for i, q in enumerate(probs.tolist()) if q >= 0.3 * probs.max()}
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1, min_p=0.3))) == expected


def test_temperature_sharpens_and_flattens():
    cold = filter_logits(LOGITS, SamplingParams(temperature=0.5)).softmax(-1)
    hot = filter_logits(LOGITS, SamplingParams(temperature=2.0)).softmax(-1)
    assert cold[0] > LOGITS.softmax(-1)[0] > hot[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = apply_penalties(LOGITS, torch.tensor([0, 4]), torch.tensor([], dtype=torch.long), SamplingParams(repetition_penalty=2.0))
    assert out[0] == pytest.approx(1.0) and out[4] == pytest.approx(-2.0) and out[1] == LOGITS[1]


def test_presence_and_frequency_penalties_count_generated_tokens():
    gen = torch.tensor([1, 1, 2])
    out = apply_penalties(LOGITS, gen, gen, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out[1] == pytest.approx(1.0 - 0.5 - 0.5)
    assert out[2] == pytest.approx(0.5 - 0.5 - 0.25)
    assert out[0] == LOGITS[0]


def test_seed_reproduces_and_sampling_follows_distribution():
    p = SamplingParams(temperature=1.0, seed=1234)
    a = [sample(LOGITS, p, g) for g in [p.generator()] for _ in range(50)]
    b = [sample(LOGITS, p, g) for g in [p.generator()] for _ in range(50)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(LOGITS, SamplingParams(temperature=1.0), g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert torch.allclose(freq, LOGITS.softmax(-1), atol=0.03)


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2.0),
    dict(repetition_penalty=0.0), dict(presence_penalty=3.0), dict(frequency_penalty=-2.5), dict(temperature=float("nan")),
])
def test_invalid_values_raise(bad):
    with pytest.raises(SamplingError):
        SamplingParams(**bad)


def test_draw_follows_the_weights_and_never_takes_a_zero():
    """draw() against the distribution itself: frequencies over many draws within a few standard errors of the
    weights (normalised or not), zero-weight tokens never drawn, wherever they sit (first, last, between)."""
    from camelid.sampling import draw

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 1e-4, 0.0])
    gen = torch.Generator().manual_seed(7)
    n = 40_000
    counts = torch.bincount(torch.tensor([draw(weights, gen) for _ in range(n)]), minlength=len(weights))
    p = weights / weights.sum()
    assert counts[p == 0].sum() == 0
    stderr = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 5 * stderr + 1e-9).all(), (counts / n, p)
    assert draw(torch.tensor([0.0, 0.0, 2.0]), gen) == 2 and draw(torch.tensor([5.0, 0.0, 0.0]), gen) == 0
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [draw(weights, a) for _ in range(50)] == [draw(weights, b) for _ in range(50)]  # the seed reproduces
    with pytest.raises(SamplingError):
        draw(torch.zeros(4), gen)


def test_draw_at_the_top_of_the_range_takes_the_last_token_with_weight(monkeypatch):
    """u * total rounding up to the total (u just below 1) still lands on a token that has weight."""
    from camelid import sampling

    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))
    assert sampling.draw(torch.tensor([0.2, 0.7, 0.1, 0.0, 0.0])) == 2
