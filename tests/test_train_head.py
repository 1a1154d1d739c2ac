"""The fused output layer + cross-entropy of training (camelid/train/head.py) against the output layer followed by
torch's own F.cross_entropy: the same summed loss and the same gradients for the hidden rows and the weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camelid.train import head as H


def _case(n: int, vocab: int, dim: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(vocab, dim, generator=g) * 0.3
    t = torch.randint(0, vocab, (n,), generator=g)
    return x, w, t


@pytest.mark.parametrize("chunk", [1 << 23, 64 * 5])  # one chunk; chunks of 5 rows, the last one short
@pytest.mark.parametrize("weight_grad", [False, True])
def test_loss_and_gradients_match_the_output_layer_then_cross_entropy(monkeypatch, chunk, weight_grad):
    monkeypatch.setattr(H, "CHUNK_ELEMENTS", chunk)
    x, w, t = _case(23, 64)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(weight_grad)
    ref = F.cross_entropy(xr @ wr.t(), t, reduction="sum")
    (ref * 0.37).backward()
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(weight_grad)
    got = H.linear_cross_entropy(xf, wf, t)
    (got * 0.37).backward()  # the incoming gradient scales what the forward kept
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-6)
    if weight_grad:
        torch.testing.assert_close(wf.grad, wr.grad, rtol=1e-5, atol=1e-6)
    else:
        assert wf.grad is None


def test_without_gradients_it_is_the_loss_alone():
    x, w, t = _case(9, 50)
    with torch.no_grad():
        got = H.linear_cross_entropy(x.requires_grad_(True), w, t)
    assert not got.requires_grad
    torch.testing.assert_close(got, F.cross_entropy(x.detach() @ w.t(), t, reduction="sum"))


def test_bf16_autocast_is_autocasts_arithmetic():
    """Under bf16 autocast both products run in bfloat16 (as the autocast output layer's) and the softmax in
    float32: the loss lands within bfloat16 rounding of autocast's own, and differs from float32's."""
    x, w, t = _case(40, 300, dim=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((x @ w.t()).float(), t, reduction="sum")
        got = H.linear_cross_entropy(x, w, t)
    exact = F.cross_entropy(x @ w.t(), t, reduction="sum")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    assert got != exact
