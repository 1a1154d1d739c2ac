"""Embeddings: the final norm's hidden states of the model's ordinary forward, pooled over each text's tokens.

There is no second model: `Transformer.forward(..., hidden=True)` stops before the output head, and a pooling
reads one vector per text from its [T,D] states, as llama.cpp does (its `result_norm` tensor, pooled by
`--pooling`):
    mean  the average over every token of the text (BOS included when the tokenizer adds one)
    last  the last token's state (what a causal model has seen the whole text at)
    cls   the first token's state (an encoder's [CLS]; on a causal decoder it sees only the first token, so with a
          BOS every text gets the same vector: kept for parity with llama.cpp, useless for retrieval there)
The vectors are L2-normalised unless asked not to be (llama.cpp's default `--embd-normalize 2`).

Texts are batched with right padding: attention is causal, so a row's real tokens never see its padding. A text
is padded to a length set by its own length alone (the next multiple of PAD_TO) and batched only with texts padded
alike, so its forward has the same shape, and takes the same kernels, alone or among others: its vector is the same,
bit for bit (the products of one row do not depend on how many rows are beside it; tests/test_embed.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLINGS = ("mean", "last", "cls")
DEFAULT_POOLING = "mean"
BATCH_TOKENS = 4096  # padded tokens per forward: bounds the activations (and, in the server, the pause it causes)
PAD_TO = 32  # a text of n tokens runs padded to the next multiple of PAD_TO


def check_pooling(pooling: str) -> str:
    """The pooling name, or ValueError naming the choices."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    return pooling


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden [B,T,D] (rows right-padded), lengths [B] -> [B,D] float32: each row's pooled vector."""
    hidden = hidden.float()
    B, T, _ = hidden.shape
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        return hidden[torch.arange(B, device=hidden.device), lengths - 1]
    if pooling == "mean":
        mask = (torch.arange(T, device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)  # [B,T]
        return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
    raise ValueError(check_pooling(pooling))


def padded_length(n: int) -> int:
    """The length a text of n tokens runs at: the next multiple of PAD_TO (depends on n alone)."""
    return -(-n // PAD_TO) * PAD_TO


def batches(lengths: Sequence[int], max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of the inputs grouped by padded length, each group at most max_tokens padded tokens (one row at least)."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(padded_length(n), []).append(i)
    out = []
    for T, members in sorted(by_length.items()):
        rows = max(1, max_tokens // T)
        out += [members[k : k + rows] for k in range(0, len(members), rows)]
    return out


@torch.inference_mode()
def embed_batch(model: torch.nn.Module, rows: Sequence[Sequence[int]], pooling: str = DEFAULT_POOLING,
                normalize: bool = True) -> torch.Tensor:
    """One forward over token rows of one padded length -> [N,D] float32 pooled vectors, L2-normalised if asked."""
    check_pooling(pooling)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every input needs at least one token")
    lengths = torch.tensor([len(r) for r in rows])
    T = padded_length(int(lengths.max()))
    if any(padded_length(len(r)) != T for r in rows):
        raise ValueError("a batch's rows must share one padded length (group them with batches())")
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    device = model.device
    hidden = model(tokens.to(device), hidden=True)  # [N,T,D], causal: the padding is after every real token
    out = pool(hidden, lengths.to(device), pooling).cpu()
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def embed_ids(model: torch.nn.Module, inputs: Sequence[Sequence[int]], pooling: str = DEFAULT_POOLING,
              normalize: bool = True, max_tokens: int = BATCH_TOKENS) -> torch.Tensor:
    """Token lists -> [N,D] float32 vectors, in forwards of at most max_tokens padded tokens each."""
    out: list[torch.Tensor | None] = [None] * len(inputs)
    for group in batches([len(x) for x in inputs], max_tokens):
        vectors = embed_batch(model, [inputs[i] for i in group], pooling, normalize)
        for i, v in zip(group, vectors, strict=True):
            out[i] = v
    return torch.stack(out) if out else torch.empty(0, model.config.dim)


def shorten(vectors: torch.Tensor, dimensions: int, normalize: bool = True) -> torch.Tensor:
    """The first `dimensions` components of each vector [N,D], L2-normalised again if asked (Matryoshka-style)."""
    if not 1 <= dimensions <= vectors.shape[-1]:
        raise ValueError(f"dimensions must be between 1 and {vectors.shape[-1]}, got {dimensions}")
    out = vectors[..., :dimensions]
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
