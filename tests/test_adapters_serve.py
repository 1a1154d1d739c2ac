"""Adapters at inference: camelid.load(adapter=...), `run --adapter`, and `serve --adapter NAME=DIR` with rows of
different adapters in one batch of the continuous-batching engine (same greedy tokens as each alone)."""

from __future__ import annotations

import threading

import pytest
import torch
from gguf import GGMLQuantizationType as G
from gguf_factory import Spec, byte_level_vocab, write_gguf

import camelid
from camelid import cli
from camelid.errors import CamelidError, FormatError
from camelid.formats import read
from camelid.formats.peft import Adapter, write_adapter
from camelid.generate import Request, generate
from camelid.loader import build_model
from camelid.sampling import GREEDY
from camelid.serve import build_state, parse_adapters
from camelid.serve.engine import Finish, make_sequence
from camelid.train.lora import module_shapes, use_adapters

PROMPTS = [[72, 101, 108, 108, 111], [84, 104, 101, 32, 114, 105, 118, 101, 114], [65, 66]]
NEW = 8


def _adapter(shapes, targets, seed, r=4, size=0.4) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    pairs = {m: (torch.randn(r, i, generator=g) * size, torch.randn(o, r, generator=g) * size)
             for m, (o, i) in shapes.items() if m.rsplit(".", 1)[1] in targets}
    return Adapter(r=r, alpha=2.0 * r, pairs=pairs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    path = root / "tiny.gguf"
    write_gguf(path, Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, tied=True), byte_level_vocab(),
               G.Q4_0)
    shapes = module_shapes(build_model(read(path)))
    a = write_adapter(_adapter(shapes, ("wq", "wv", "w2"), seed=1), root / "ad-a")
    b = write_adapter(_adapter(shapes, ("wk", "wo", "w1", "w3"), seed=2), root / "ad-b")
    return path, a, b


def _alone(model, prompt, adapter):
    with use_adapters(model, adapter):
        return [s[0] for s in generate(model, [Request(prompt, NEW)])]


class Collector:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Finish):
            self.done.set()
        else:
            self.ids.append(event.id)


@pytest.mark.parametrize("quant", ["auto", None])
def test_engine_batches_rows_of_different_adapters(setup, quant):
    path, a, b = setup
    state = build_state(str(path), quant=quant, adapters={"a": str(a), "b": str(b)}, max_concurrency=9,
                        max_seq_len=64, model_id="tiny")
    model = state.engine.model
    jobs = [(p, name) for p in PROMPTS for name in (None, "a", "b")]
    want = [_alone(model, p, name) for p, name in jobs]  # generate.py, one request at a time, model-wide adapter
    for p in range(len(PROMPTS)):
        assert want[3 * p] != want[3 * p + 1] and want[3 * p] != want[3 * p + 2] and want[3 * p + 1] != want[3 * p + 2]
    engine = state.engine
    outs = [(c := Collector(), make_sequence(p, NEW, c, adapter=name)) for p, name in jobs]
    with engine.cond:  # all queued before the engine thread looks: they are admitted and decoded together
        engine.start()
        for _, seq in outs:
            engine.submit(seq)
    try:
        for c, _ in outs:
            assert c.done.wait(120)
    finally:
        engine.stop()
    assert [c.ids for c, _ in outs] == want


def test_server_routes_by_model_and_lists_adapters(setup):
    from starlette.testclient import TestClient

    from camelid.serve.app import create_app

    path, a, b = setup
    state = build_state(str(path), adapters={"a": str(a), "b": str(b)}, max_concurrency=4, max_seq_len=64,
                        model_id="tiny")
    with TestClient(create_app(state)) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["tiny", "a", "b"]

        def ask(model):
            r = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[1], "max_tokens": NEW,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            return r.json()["choices"][0]["text"]

        alone = {m: ask(m) for m in ("tiny", "a", "b")}
        assert len(set(alone.values())) == 3
        together: dict[str, str] = {}
        threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, ask(m))) for m in ("b", "tiny", "a")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
        r = client.post("/v1/completions", json={"model": "c", "prompt": PROMPTS[0], "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "'a'" in r.json()["error"]["message"]


@pytest.mark.parametrize("quant", ["auto", None])
def test_load_with_an_adapter_applies_it_unmerged(setup, quant):
    path, a, _ = setup
    llm = camelid.load(str(path), quant=quant, adapter=a)
    got = llm.start(PROMPTS[0], max_tokens=NEW, sampling=GREEDY).run().token_ids
    base = build_model(read(path), quant=quant)
    assert got == _alone(llm.model, PROMPTS[0], "default")
    assert got != _alone(base, PROMPTS[0], None)
    # nothing merged: the weights are the base's own, and with the adapter off the output is the base's
    assert all(torch.equal(t, base.state_dict()[k.replace(".base.", ".")]) for k, t in llm.model.state_dict().items()
               if "adapters" not in k)
    with use_adapters(llm.model, None):
        assert llm.start(PROMPTS[0], max_tokens=NEW, sampling=GREEDY).run().token_ids == _alone(base, PROMPTS[0], None)


def test_the_prompt_cache_keeps_an_adapters_kv_apart_from_the_bases(setup):
    """One loaded model, its adapter switched off and on: a prompt's cached chunks are reused only under the
    adapter that computed them (a 20-token prompt keeps a whole 16-token chunk on any path)."""
    path, a, _ = setup
    llm = camelid.load(str(path), quant="auto", adapter=a)
    base = build_model(read(path), quant="auto")
    prompt = [*PROMPTS[1], *PROMPTS[0], *PROMPTS[1], 33]

    def run():
        c = llm.start(prompt, max_tokens=NEW, sampling=GREEDY).run()
        return c.token_ids, c.cached_tokens

    on, cached = run()
    assert cached == 0 and on == _alone(llm.model, prompt, "default")
    with use_adapters(llm.model, None):
        off, cached = run()
        assert cached == 0  # nothing of the base's kept yet: the adapter's chunk is not it
        assert off == _alone(base, prompt, None) != on
        again, cached = run()
        assert again == off and cached >= 16  # the base's own chunks, now kept (to the token with the kernel)
    assert run() == (on, 16)  # the adapter's whole chunk only


def test_one_line_errors(setup, tmp_path, capsys):
    path, a, _ = setup
    with pytest.raises(FormatError, match="not a peft adapter folder"):
        camelid.load(str(path), adapter=tmp_path)
    other = tmp_path / "other"
    bad = _adapter({"layers.0.attention.wq": (64, 32)}, ("wq",), seed=0)
    write_adapter(bad, other)
    with pytest.raises(FormatError, match=r"another base: layers.0.attention.wq is \[64, 64\].*\[64, 32\]"):
        camelid.load(str(path), adapter=other)
    with pytest.raises(CamelidError, match="adapter x .*another base"):
        build_state(str(path), adapters={"x": str(other)}, max_seq_len=64)
    for value, msg in [("=dir", "expected NAME=DIR"), ("name=", "expected NAME=DIR"), ("tiny=" + str(a), "base model's")]:
        with pytest.raises(CamelidError, match=msg):
            parse_adapters([value], "tiny")
    with pytest.raises(CamelidError, match="given twice"):
        parse_adapters([f"a={a}", f"a={a}"], "tiny")
    assert parse_adapters([str(a), f"x={a}"], "tiny") == {"ad-a": str(a), "x": str(a)}
    assert cli.main(["run", str(path), "hi", "--adapter", str(tmp_path / "nope"), "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("camelid: error: no such adapter folder") and err.count("\n") == 1
