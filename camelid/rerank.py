"""Reranking: score (query, document) pairs with the model itself, two ways.

    llm        the model's own relevance judgement, read from its token probabilities, as LLM rerankers do
               (Qwen3-Reranker, RankGPT-style pointwise "yes"/"no"): the pair goes through the chat template with
               the instruction below, and the score is P(yes) / (P(yes) + P(no)) at the answer's first token, the
               "yes" and "no" spellings ("yes", "Yes", " yes", ...) each summed.
    embedding  the cosine similarity of the query's and the document's embeddings (camelid/embed.py), in [-1, 1].

Pairs are batched like embeddings (right padding to a length set by each prompt alone, see embed.padded_length),
so a pair's score does not depend on the documents beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import chat as chat_mod
from . import embed
from .tokenizer import Tokenizer

METHODS = ("llm", "embedding")
DEFAULT_METHOD = "embedding"  # the more reliable on small models (the default model: see tests/test_embed.py)
INSTRUCTION = ('Judge whether the Document answers the Query or is relevant to it. Note that the answer can only '
               'be "yes" or "no".')


def pair_prompt(tokenizer: Tokenizer, template: str, query: str, document: str) -> list[int]:
    """The judgement prompt's ids for one pair, ending where the assistant's answer begins."""
    messages = [{"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": f"<Query>: {query}\n<Document>: {document}\nDoes the Document answer the Query?"}]
    return chat_mod.encode_chat(tokenizer, messages, template)


def answer_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The single-token spellings of "yes" and of "no" in this vocabulary."""
    def spellings(word: str) -> list[int]:
        out = set()
        for form in (word, word.capitalize(), " " + word, " " + word.capitalize(), word.upper()):
            ids = tokenizer.encode(form, special=False, bos=False)
            if len(ids) == 1:
                out.add(ids[0])
        return sorted(out)

    yes, no = spellings("yes"), spellings("no")
    if not yes or not no:
        raise ValueError("this vocabulary has no single token for 'yes' or 'no'; use the embedding method")
    return yes, no


@torch.inference_mode()
def judge_batch(model: torch.nn.Module, rows: Sequence[Sequence[int]], yes: Sequence[int], no: Sequence[int]) -> torch.Tensor:
    """P(yes) / (P(yes) + P(no)) [N] after each prompt; the rows share one padded length (embed.batches)."""
    lengths = torch.tensor([len(r) for r in rows])
    T = embed.padded_length(int(lengths.max()))
    if any(embed.padded_length(len(r)) != T for r in rows):
        raise ValueError("a batch's rows must share one padded length (group them with embed.batches())")
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    device = model.device
    logits = model(tokens.to(device), logits_at=(lengths - 1).to(device))[:, 0].float().cpu()  # [N,V]
    lp = torch.log_softmax(logits, -1)
    return torch.sigmoid(lp[:, list(yes)].logsumexp(-1) - lp[:, list(no)].logsumexp(-1))


def cosine_scores(query: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """query [D] and documents [N,D], L2-normalised -> [N] cosine similarities (one dot product per document, so a
    score does not depend on how many documents are beside it, as one matrix product's could)."""
    return torch.stack([d @ query for d in documents])


def ranked(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices by score, best first (ties keep the documents' order), the first top_n of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order if top_n is None else order[:top_n]
