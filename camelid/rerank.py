"""Reranking: score (query, document) pairs with the model itself, three ways.

    likelihood how likely the model finds the query as a question about the document (query likelihood, as in
               UPR, Sachan et al. 2022): the mean log-probability of the query's tokens after "Passage: {document}
               Please write a question based on this passage. Question:", reported as its exp, the geometric
               mean of the query tokens' probabilities, in (0, 1]. It needs no instruction following, so it holds
               up on small models (the default model ranks every case of tests/test_embed.py right with it).
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

METHODS = ("likelihood", "llm", "embedding")
DEFAULT_METHOD = "likelihood"  # the most reliable on small models (the default model: see tests/test_embed.py)
INSTRUCTION = ('Judge whether the Document answers the Query or is relevant to it. Note that the answer can only '
               'be "yes" or "no".')


def pair_prompt(tokenizer: Tokenizer, template: str, query: str, document: str) -> list[int]:
    """The judgement prompt's ids for one pair, ending where the assistant's answer begins."""
    messages = [{"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": f"<Query>: {query}\n<Document>: {document}\nDoes the Document answer the Query?"}]
    return chat_mod.encode_chat(tokenizer, messages, template)


def likelihood_prompt(tokenizer: Tokenizer, query: str, document: str) -> tuple[list[int], int]:
    """(ids of the passage prompt followed by the query, where the query's tokens start)."""
    prefix = tokenizer.encode(f"Passage: {document}\nPlease write a question based on this passage.\nQuestion:",
                              special=False, bos=True)
    return prefix + tokenizer.encode(" " + query, special=False, bos=False), len(prefix)


def pair_rows(method: str, tokenizer: Tokenizer, template: str, query: str, document: str) -> tuple[list[int], int]:
    """(prompt ids, where the scored tokens start) of one pair for the "likelihood" or "llm" method."""
    if method == "likelihood":
        return likelihood_prompt(tokenizer, query, document)
    ids = pair_prompt(tokenizer, template, query, document)
    return ids, len(ids)


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


@torch.inference_mode()
def likelihood_batch(model: torch.nn.Module, rows: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
    """exp(mean log P(row[t] | row[:t]) for t >= start) [N]: the query's likelihood after its passage prompt."""
    lengths = [len(r) for r in rows]
    T = embed.padded_length(max(lengths))
    if any(embed.padded_length(n) != T for n in lengths):
        raise ValueError("a batch's rows must share one padded length (group them with embed.batches())")
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    hidden = model(tokens.to(model.device), hidden=True)  # [N,T,D]
    out = []
    for b, (r, start) in enumerate(zip(rows, starts, strict=True)):
        # the head over this row's predicting positions only (one call per row: its shape is the row's own)
        logits = model.output(hidden[b : b + 1, start - 1 : len(r) - 1]).float()[0]  # [n,V]
        targets = torch.as_tensor(list(r[start:]), device=logits.device)
        out.append(torch.log_softmax(logits, -1).gather(1, targets[:, None]).mean().exp())
    return torch.stack(out).cpu()


def cosine_scores(query: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """query [D] and documents [N,D], L2-normalised -> [N] cosine similarities (one dot product per document, so a
    score does not depend on how many documents are beside it, as one matrix product's could)."""
    return torch.stack([d @ query for d in documents])


def ranked(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices by score, best first (ties keep the documents' order), the first top_n of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order if top_n is None else order[:top_n]
