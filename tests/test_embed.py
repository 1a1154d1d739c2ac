"""Embeddings and reranking: pooling against an independent computation, batch invariance, llama.cpp's vectors on
the same GGUF, the Python API and the `camelid embed` command. The HTTP endpoints: tests/test_serve_embed.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import camelid_cli, one_line_error, require_llama_cpp, tiny_random_model

from camelid import embed
from camelid.errors import CamelidError
from camelid.model import Transformer

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "hi",
         "A longer sentence about the weather in the mountains during winter, when the snow falls and the roads close."]


def tiny_model() -> Transformer:
    return tiny_random_model().eval()


def rows(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=g).tolist() for n in (1, 5, 31, 32, 33, 70)]


@pytest.mark.parametrize("pooling", embed.POOLINGS)
def test_pooling_matches_each_text_run_alone_without_padding(pooling):
    model = tiny_model()
    got = embed.embed_ids(model, rows(), pooling)
    for r, v in zip(rows(), got, strict=True):
        with torch.no_grad():
            h = model(torch.tensor([r]), hidden=True)[0]  # [T,D], no padding at all
            # the final norm by hand, from the last block's output: the hidden states are what the head reads
            x = model.tok_embeddings(torch.tensor([r]))
            pos = torch.arange(len(r))[None]
            from camelid.model import rope_tables

            cos, sin = rope_tables(pos, model.inv_freq)
            for layer in model.layers:
                x = layer(x, cos, sin, pos, None)
            ref_h = model.norm(x)[0]
        torch.testing.assert_close(h, ref_h)
        want = {"mean": ref_h.mean(0), "last": ref_h[-1], "cls": ref_h[0]}[pooling]
        torch.testing.assert_close(v, want / want.norm(), atol=1e-5, rtol=1e-5)


def test_hidden_states_feed_the_output_head():
    model = tiny_model()
    tokens = torch.tensor([rows()[2]])
    with torch.no_grad():
        assert torch.equal(model.output(model(tokens, hidden=True)).float(), model(tokens))


@pytest.mark.parametrize("pooling", embed.POOLINGS)
def test_a_text_gives_the_same_vector_alone_and_in_any_batch(pooling):
    """Exactly (bit for bit): a text runs at a padded length set by its own length, beside any others."""
    model = tiny_model()
    batch = rows()
    together = embed.embed_ids(model, batch, pooling)
    backwards = embed.embed_ids(model, batch[::-1], pooling).flip(0)
    for i, r in enumerate(batch):
        alone = embed.embed_ids(model, [r], pooling)[0]
        assert torch.equal(alone, together[i]) and torch.equal(alone, backwards[i])


def test_batches_group_by_padded_length_within_the_budget():
    lengths = [1, 40, 32, 33, 64, 5, 200]
    groups = embed.batches(lengths, max_tokens=96)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len({embed.padded_length(lengths[i]) for i in g}) == 1
        assert len(g) == 1 or len(g) * embed.padded_length(lengths[g[0]]) <= 96
    assert [embed.padded_length(n) for n in (1, 32, 33)] == [32, 32, 64]


def test_shorten_truncates_and_renormalises():
    v = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    short = embed.shorten(v, 4)
    torch.testing.assert_close(short, v[:, :4] / v[:, :4].norm(dim=-1, keepdim=True))
    assert torch.equal(embed.shorten(v, 4, normalize=False), v[:, :4])
    with pytest.raises(ValueError, match="between 1 and 16"):
        embed.shorten(v, 17)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="mean, last, cls"):
        embed.check_pooling("max")


# --- the default model ---

@pytest.fixture(scope="module")
def llama_cpp_peer(default_model_path):
    llama_cpp = require_llama_cpp()
    return llama_cpp


LLAMA_POOLING = {"mean": "LLAMA_POOLING_TYPE_MEAN", "last": "LLAMA_POOLING_TYPE_LAST", "cls": "LLAMA_POOLING_TYPE_CLS"}


@pytest.fixture(scope="module")
def fast_llm(default_model_path):
    import camelid

    return camelid.load(default_model_path)  # the fast path: what `camelid serve` runs


@pytest.mark.parametrize("pooling", embed.POOLINGS)
def test_vectors_match_llama_cpp_on_the_same_gguf(llm, fast_llm, llama_cpp_peer, default_model_path, pooling):
    """llama.cpp pools its final norm's output (`result_norm`) the same three ways; its embed() tokenizes with BOS
    as the GGUF says and no special-token parsing, as camelid's embed does. The served (fast) path: cosine >= 0.999
    for every text. The float32 reference path: >= 0.999 on average and >= 0.998 for each text (one text, mean
    pooling, measured 0.99879: llama.cpp rounds the activations to 8 bits (Q8_1) inside its Q4_1 products, the
    reference path does not; our reading, not checked further)."""
    peer = llama_cpp_peer.Llama(model_path=str(default_model_path), embedding=True, n_ctx=512, verbose=False,
                                pooling_type=getattr(llama_cpp_peer, LLAMA_POOLING[pooling]))
    try:
        theirs = torch.stack([torch.tensor(peer.embed(t, normalize=True)) for t in TEXTS])
        their_ids = [peer.tokenize(t.encode()) for t in TEXTS]
    finally:
        peer.close()
    assert their_ids == [llm.tokenizer.encode(t, special=False, bos=True) for t in TEXTS]
    assert all(abs(float(b.norm()) - 1) < 1e-4 for b in theirs)  # llama.cpp's L2 normalisation, as ours
    fast = (torch.tensor(fast_llm.embed(TEXTS, pooling=pooling)) * theirs).sum(-1)
    ref = (torch.tensor(llm.embed(TEXTS, pooling=pooling)) * theirs).sum(-1)
    assert float(fast.min()) >= 0.999, (pooling, fast.tolist())
    assert float(ref.min()) >= 0.998 and float(ref.mean()) >= 0.999, (pooling, ref.tolist())


def test_llm_embed_api(llm):
    one = llm.embed("hello world")
    assert isinstance(one, list) and len(one) == llm.config.dim and isinstance(one[0], float)
    assert abs(sum(x * x for x in one) - 1) < 1e-5
    two = llm.embed(["hello world", "bye"], dimensions=16)
    assert len(two) == 2 and len(two[0]) == 16
    torch.testing.assert_close(torch.tensor(two[0]), embed.shorten(torch.tensor([one]), 16)[0])
    raw = llm.embed("hello world", normalize=False)
    assert abs(sum(x * x for x in raw) - 1) > 1e-3
    with pytest.raises(CamelidError, match="unknown pooling"):
        llm.embed("x", pooling="max")
    with pytest.raises(CamelidError, match="longer than the context"):
        llm.embed("word " * (llm.config.max_seq_len + 10))
    with pytest.raises(CamelidError, match="empty"):
        llm.embed([""])


RERANK_CASES = [
    ("What is the capital of France?",
     ["Bananas are rich in potassium and grow in tropical climates.", "Paris is the capital and largest city of France."]),
    ("How do I boil an egg?",
     ["Place the egg in boiling water for about nine minutes, then cool it in cold water.",
      "The stock market fell sharply on Tuesday."]),
    ("Who wrote Romeo and Juliet?",
     ["Photosynthesis converts light into chemical energy in plants.",
      "Romeo and Juliet is a tragedy written by William Shakespeare."]),
    ("What do pandas eat?", ["Python is a popular programming language.", "Giant pandas eat almost only bamboo."]),
    ("What are llamas used for?",
     ["Alpacas are smaller than llamas and are bred mainly for their fibre.", "Python 3.12 was released in October 2023.",
      "Llamas are domesticated South American camelids, used as pack animals by Andean cultures."]),
]
RELEVANT = [1, 0, 1, 1, 2]


def test_rerank_puts_the_relevant_document_first(llm):
    """The default method (query likelihood) on clear cases. Mean-pooled embeddings of this chat model miss the
    last one (the alpaca sentence is nearer the query), and the yes/no judgement misses some: see the note."""
    for (query, docs), want in zip(RERANK_CASES, RELEVANT, strict=True):
        out = llm.rerank(query, docs)
        assert out[0]["index"] == want, (query, out)
        assert out[0]["relevance_score"] > out[1]["relevance_score"]
        assert out[0]["document"] == docs[want]
    assert len(llm.rerank(*RERANK_CASES[0], top_n=1)) == 1


# --- the command ---

def test_embed_command_prints_the_api_vectors(llm, default_model_path):
    r = camelid_cli("embed", str(default_model_path), TEXTS[0], TEXTS[2], "--json", "--reference", "--pooling", "last")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["pooling"] == "last" and out["dimensions"] == llm.config.dim and len(out["data"]) == 2
    want = llm.embed([TEXTS[0], TEXTS[2]], pooling="last")
    for got, w in zip(out["data"], want, strict=True):
        torch.testing.assert_close(torch.tensor(got["embedding"]), torch.tensor(w))
    plain = camelid_cli("embed", str(default_model_path), TEXTS[0], "--reference", "--pooling", "last")
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == 1
    torch.testing.assert_close(torch.tensor([float(x) for x in plain.stdout.split()]), torch.tensor(want[0]),
                               atol=1e-5, rtol=1e-5)


def test_embed_command_errors_are_one_line(tmp_path):
    assert "nothing to embed" in one_line_error(camelid_cli("embed"))
    assert "no such file" in one_line_error(camelid_cli("embed", "--file", str(tmp_path / "missing.txt")))
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no text to embed" in one_line_error(camelid_cli("embed", "--file", str(tmp_path / "blank.txt")))
    assert "--dimensions must be >= 1" in one_line_error(camelid_cli("embed", "x", "--dimensions", "0"))
