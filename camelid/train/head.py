"""The output layer and the cross-entropy as one step, chunk by chunk: training's loss without the [N, vocabulary]
logits ever kept.

For hidden rows x [N, D], the output weight W [V, D] and targets t [N], with a summed loss:

    logits = x W^T                         loss = sum_n logsumexp(logits_n) - logits_n[t_n]
    G = d loss / d logits = softmax(logits) - onehot(t)
    d x = G W                              d W = G^T x

The forward knows the loss is a sum, so it computes G for a chunk of rows right away, turns it into the chunk's
d x (and its share of d W), and drops the chunk's logits; the backward only scales what it kept by the incoming
gradient. Against the output layer followed by F.cross_entropy this keeps one chunk of logits instead of all of
them and their gradient (at 2048 targets and a 49152-token vocabulary, 400 MB each in float32) and skips the
log-softmax's own backward pass. The arithmetic is autocast's: both products in `dtype` (bfloat16 under bf16
autocast), the log-softmax in float32.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # float32 logits per chunk (32 MB): rows per chunk = this // vocabulary size


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                grad_x: bool, grad_w: bool) -> torch.Tensor:
        n, vocab = x.shape[0], weight.shape[0]
        w = weight.to(dtype)
        xs = x.to(dtype)
        dx = torch.empty_like(xs) if grad_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        rows = max(1, CHUNK_ELEMENTS // vocab)
        for s in range(0, n, rows):
            xc, tc = xs[s : s + rows], targets[s : s + rows]
            logits = (xc @ w.t()).float()  # [rows, V]
            picked = logits.gather(1, tc[:, None])[:, 0]
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place of the logits: one pass, no second [rows, V] buffer
            total = e.sum(dim=-1, keepdim=True)
            loss += (top[:, 0] + total[:, 0].log() - picked).sum()  # logsumexp - the target's logit
            if grad_x or grad_w:
                g = e.div_(total)  # softmax
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0
                g = g.to(dtype)
                if grad_x:
                    dx[s : s + rows] = g @ w
                if grad_w:
                    dw += (g.t() @ xc).float()
        ctx.save_for_backward(*(t for t in (dx, dw) if t is not None))
        ctx.grads = (grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grad_x, grad_w = ctx.grads
        dx = (saved.pop(0) * grad_loss).to(ctx.dtypes[0]) if grad_x else None
        dw = (saved.pop(0) * grad_loss).to(ctx.dtypes[1]) if grad_w else None
        return dx, dw, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum over rows of cross_entropy(x @ weight.T, targets), float32, with gradients for x and weight where they
    require them. x [N, D], weight [V, D], targets [N] (every one a token id: select the trained rows first).
    dtype: the products' type (default: bfloat16 under CPU/CUDA bf16 autocast, else the weight's)."""
    if dtype is None:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    grads = torch.is_grad_enabled()
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets, dtype, grads and x.requires_grad,
                                         grads and weight.requires_grad)
