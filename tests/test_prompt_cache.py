"""The prompt cache: the schedule, the block store's bounds and isolation, and exact reuse in the engine."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import Collector

from camelid.cache import KVCache
from camelid.prompt_cache import Block, BlockStore, PromptCache, chunk_key, next_chunk, rows_independent
from camelid.sampling import GREEDY
from camelid.serve.engine import Engine, make_sequence


def test_schedule_is_a_function_of_positions_and_prefix_consistent():
    for length in (1, 15, 16, 17, 255, 256, 257, 300, 513, 1000):
        pos, spans = 0, []
        while pos < length:
            end = next_chunk(pos, length, 256, 16)
            spans.append((pos, end))
            pos = end
        assert spans[-1][1] == length
        for a, b in spans[:-1]:  # whole chunks, aligned
            assert (b - a == 256 and a % 256 == 0) or (b - a == 16 and a % 16 == 0)
        # every whole small chunk of a shorter prompt is the same chunk in a longer one unless a big chunk covers it
        longer = length + 40
        ends = set()
        pos = 0
        while pos < longer:
            pos = next_chunk(pos, longer, 256, 16)
            ends.add(pos)
        for _, b in spans[:-1]:
            assert b in ends or (b // 256) * 256 + 256 <= longer


def test_store_evicts_least_recently_used_within_its_bytes():
    block = lambda: Block(torch.zeros(1000, dtype=torch.float32), "m")  # noqa: E731  4000 bytes
    store = BlockStore(10_000)
    for key in (b"a", b"b"):
        store.put(key, block())
    store.get(b"a")  # a is now the most recent
    store.put(b"c", block())
    assert store.bytes <= store.capacity and set(store.blocks) == {b"a", b"c"} and store.evictions == 1
    store.drop_owner("m")
    assert store.bytes == 0 and len(store) == 0
    off = BlockStore(0)
    off.put(b"a", block())
    assert not off.enabled and len(off) == 0


def test_running_requests_kv_counts_against_the_same_budget():
    block = lambda: Block(torch.zeros(1000, dtype=torch.float32), "m")  # noqa: E731  4000 bytes
    store = BlockStore(10_000)
    for key in (b"a", b"b"):
        store.put(key, block())
    engine_1, engine_2 = object(), object()
    store.reserve(engine_1, 3_000)  # 8000 + 3000 > 10000: the least recently used block goes
    assert set(store.blocks) == {b"b"} and store.bytes + 3_000 <= store.capacity
    store.reserve(engine_2, 2_000)  # 4000 + 5000 fit: b stays
    assert set(store.blocks) == {b"b"}
    store.put(b"c", block())  # 4000 + 4000 + 5000 > 10000: b goes to make room for c
    assert set(store.blocks) == {b"c"} and store.room == 5_000
    store.reserve(engine_2, 6_500)  # no room left for c
    assert len(store) == 0 and store.bytes == 0
    store.put(b"d", block())  # nor for a new block
    assert len(store) == 0
    store.reserve(engine_1, 0)
    store.reserve(engine_2, 0)
    assert store.room == store.capacity and not store.running


def test_salt_adapter_and_model_keep_chains_apart():
    store = BlockStore(1 << 30)
    cache = KVCache.allocate(2, 1, 64, 1, 4)
    pc = PromptCache(store, "model-a", 32, 8)
    tokens = list(range(40))
    cache.k[0][0, :, :32] = 1.0
    key = pc.save(cache, 0, tokens, 0, 32, pc.root(None, "alice"))
    assert store.get(key) is not None
    fresh = KVCache.allocate(2, 1, 64, 1, 4)
    assert pc.restore(fresh, 0, tokens, None, "bob")[0] == 0
    assert pc.restore(fresh, 0, tokens, "adapter", "alice")[0] == 0
    assert PromptCache(store, "model-b", 32, 8).restore(fresh, 0, tokens, None, "alice")[0] == 0
    assert pc.restore(fresh, 0, tokens, None, "alice")[0] == 32 and bool((fresh.k[0][0, :, :32] == 1).all())
    # the chunk holding the last token is computed, never restored
    assert pc.restore(fresh, 0, tokens[:32], None, "alice")[0] == 0


def _filled(length: int) -> KVCache:
    """A one-row cache whose slot p holds p + 1 everywhere (so what a restore copied can be read back)."""
    cache = KVCache.allocate(2, 1, 128, 1, 4)
    for t in cache.k + cache.v:
        t[0] = (torch.arange(128, dtype=torch.float32) + 1)[None, :, None]
    return cache


def test_granular_reuse_goes_to_the_token_in_the_small_chunks_only():
    """With `granular`, a prompt's partial last small chunk is kept and a longer prompt restores it, then keeps its
    own whole chunk under the key a cold run's chunk has; a big chunk is still all or nothing; a served adapter's
    rows keep to whole chunks."""
    store = BlockStore(1 << 30)
    pc = PromptCache(store, "m", 32, 8)
    pc.granular = True
    tokens = list(range(100, 170))  # chunks [0,32) big, then small ones of 8
    src = _filled(70)
    key = pc.save(src, 0, tokens, 0, 32, pc.root())  # a whole big chunk
    assert pc.save(src, 0, tokens, 32, 40, key) == chunk_key(key, tokens[32:40])  # a whole small one
    k40 = chunk_key(key, tokens[32:40])
    assert pc.save(src, 0, tokens[:45], 40, 45, k40) == k40  # the prompt's partial last chunk: kept, the key stays
    assert store.get(chunk_key(k40, tokens[40:45])) is not None

    fresh = KVCache.allocate(2, 1, 128, 1, 4)
    pos, at = pc.restore(fresh, 0, tokens[:60])  # a longer prompt: 32 + 8, then 5 of the next chunk
    assert (pos, at) == (45, k40)
    assert torch.equal(fresh.k[1][0, 0, :45, 0], torch.arange(45, dtype=torch.float32) + 1)
    assert pc.restore(fresh, 0, tokens[:45])[0] == 44  # the last token is computed, the rest restored
    assert pc.restore(fresh, 0, tokens[:45], compute_last=False)[0] == 45
    assert pc.restore(fresh, 0, tokens[:43] + [1, 2, 3])[0] == 43  # a prompt that differs at 43: the part it shares
    # computing [45, 48) after that restore keeps the whole chunk [40, 48), under the cold run's key
    assert pc.save(src, 0, tokens[:60], 45, 48, at) == chunk_key(k40, tokens[40:48])
    assert store.get(chunk_key(k40, tokens[40:48])) is not None
    assert pc.restore(fresh, 0, tokens[:60])[0] == 48

    short = PromptCache(BlockStore(1 << 30), "m", 32, 8)
    short.granular = True
    short.save(src, 0, tokens[:20], 0, 8, short.root())
    k8 = chunk_key(short.root(), tokens[:8])
    short.save(src, 0, tokens[:20], 16, 20, chunk_key(k8, tokens[8:16]))  # a prompt of 20: small chunks only
    short.save(src, 0, tokens[:20], 8, 16, k8)
    assert short.restore(fresh, 0, tokens[:20])[0] == 19
    assert short.restore(fresh, 0, tokens[:40])[0] == 0  # at 40 tokens [0,32) is a big chunk: computed whole
    assert short.restore(fresh, 0, tokens[:20], adapter="tuned")[0] == 0  # another chain, and whole chunks only

    off = PromptCache(BlockStore(1 << 30), "m", 32, 8)  # not granular: partial chunks are neither kept nor reused
    key = off.save(src, 0, tokens, 0, 32, off.root())
    off.save(src, 0, tokens[:45], 32, 40, key)
    off.save(src, 0, tokens[:45], 40, 45, chunk_key(key, tokens[32:40]))
    assert off.restore(fresh, 0, tokens[:60])[0] == 40 and off.reusable_end(45) == 40 and pc.reusable_end(45) == 45
    assert off.root() != pc.root()  # blocks made one way are never read the other way


def test_rows_independent_on_the_fast_path_with_the_attention_kernel(fast, default_model_path):
    """Whether small prefill chunks compute each token on their own is tried on the model: yes on the quantized fast
    path with camelid's attention kernel (where it is built), no with torch's attention or the float32 reference."""
    from camelid import kernels
    from camelid.formats import read
    from camelid.loader import build_model

    if not kernels.available():
        pytest.skip("camelid's attention kernel is not built here (no C++ compiler)")
    assert rows_independent(fast.model) and all(layer.attention.kernel for layer in fast.model.layers)
    assert not rows_independent(build_model(read(default_model_path)))  # the float32 reference: torch's attention
    torchs = build_model(read(default_model_path), quant="auto")
    for layer in torchs.layers:
        layer.attention.kernel = False
    assert not rows_independent(torchs)
    assert not PromptCache(BlockStore(1 << 20), "m").bind(torchs).granular
    # tried only when first needed, and never for a cache that is off (`camelid run`, --cache-mb 0)
    from camelid import prompt_cache

    unseen = build_model(read(default_model_path), quant="auto")
    off = PromptCache(BlockStore(0), "m").bind(unseen)
    cache = KVCache.for_model(unseen, 1, 32)
    assert off.restore(cache, 0, list(range(20)))[0] == 0
    off.save(cache, 0, list(range(20)), 0, 16, off.root())
    assert off.reusable_end(20) == 16 and unseen not in prompt_cache._independent
    assert PromptCache(BlockStore(1 << 20), "m").bind(unseen).granular and unseen in prompt_cache._independent


def run(engine, prompts, max_tokens, stop_ids, together=True, salt=None):
    """Greedy outputs and the cached prompt tokens of each prompt."""
    outs = []
    for p in prompts:
        c = Collector()
        seq = make_sequence(p, max_tokens, c, stop_ids=stop_ids, salt=salt)
        engine.submit(seq)
        outs.append((c, seq))
        if not together:
            assert c.done.wait(300)
    for c, _ in outs:
        assert c.done.wait(300), "the engine did not finish"
        assert c.finish.reason in ("stop", "length")
    return [c.ids for c, _ in outs], [s.cached for _, s in outs]


@pytest.fixture(scope="module")
def fast(default_model_path):
    import camelid

    return camelid.load(default_model_path)  # the server's default path: quantized weights, bf16 products


def questions(tok, n=16):  # issue 17 names 16 prompts
    system = "You are a careful assistant for a bakery. " * 12  # ~100 tokens shared by every prompt
    return [tok.encode(f"{system}Question {i}: what is {i} times {i + 3}? Answer:", bos=True) for i in range(n)]


@pytest.fixture(scope="module")
def chunked(default_model_path):
    """The fast path with torch's attention: reuse goes by whole chunks."""
    import camelid

    llm = camelid.load(default_model_path)
    for layer in llm.model.layers:
        layer.attention.kernel = False
    llm.prompt_cache.bind(llm.model)
    return llm


@pytest.mark.slow
@pytest.mark.parametrize("granular", [True, False], ids=["to-the-token", "whole-chunks"])
def test_greedy_is_byte_identical_cache_off_cold_warm_and_concurrent(granular, request):
    fast = request.getfixturevalue("fast" if granular else "chunked")
    if granular and not rows_independent(fast.model):
        pytest.skip("camelid's attention kernel is not built here: reuse goes by whole chunks")
    tok = fast.tokenizer
    prompts = questions(tok)
    assert len(prompts[0]) > 64  # past a whole big chunk (64 here) and several small ones
    off = Engine(fast.model, tok, max_concurrency=4, max_seq_len=512, prefill_chunk=64)
    off.start()
    try:
        want, cached = run(off, prompts, 12, tok.stop_ids, together=False)
    finally:
        off.stop()
    assert cached == [0] * len(prompts)
    assert len({tuple(w) for w in want}) > 1  # the questions get different answers

    store = BlockStore(256 << 20)
    on = Engine(fast.model, tok, max_concurrency=4, max_seq_len=512, prefill_chunk=64,
                prompt_cache=PromptCache(store, "default", 64, 16))
    on.start()
    try:
        cold, cold_cached = run(on, prompts, 12, tok.stop_ids, together=False)  # the first is cold, the rest reuse
        warm, warm_cached = run(on, prompts, 12, tok.stop_ids, together=False)
        concurrent, conc_cached = run(on, prompts, 12, tok.stop_ids, together=True)
        salted, salted_cached = run(on, prompts[:2], 12, tok.stop_ids, together=False, salt="other tenant")
    finally:
        on.stop()
    assert cold == want and warm == want and concurrent == want and salted == want[:2]
    assert cold_cached[0] == 0 and min(cold_cached[1:]) >= 64
    assert min(warm_cached) >= 64 and min(conc_cached) >= 64
    assert salted_cached[0] == 0 and salted_cached[1] >= 64  # the salt's own chain, never the others'
    assert store.hits > 0 and store.misses >= 2 and store.bytes <= store.capacity
    assert on.prompt_cache.granular == granular
    if granular:  # the shared system prompt to its last token, whatever chunk it ends in
        shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1], strict=False)) if a != b)
        assert min(warm_cached) >= shared and min(cold_cached[1:]) >= shared


@pytest.mark.slow
def test_api_chat_turns_reuse_the_previous_turns_and_answer_the_same(fast, default_model_path):
    import camelid

    plain = camelid.load(default_model_path, cache_mb=0)
    history = [{"role": "system", "content": "You are a terse assistant. " * 8}]
    turns = ["Name a colour.", "Name a fruit of that colour.", "How many letters has it?"]
    cached = []
    for text in turns:
        history.append({"role": "user", "content": text})
        ids = fast.encode_chat(history)
        got = fast.start(ids, max_tokens=20, sampling=GREEDY).run()
        want = plain.start(ids, max_tokens=20, sampling=GREEDY).run()
        assert got.token_ids == want.token_ids and want.cached_tokens == 0
        cached.append((got.cached_tokens, len(ids), len(got.token_ids)))
        history.append({"role": "assistant", "content": got.text})
    for (now, length, _), (_, before, answer) in zip(cached[1:], cached[:-1]):
        if fast.prompt_cache.granular:  # the previous prompt and answer, to the token: the turn's new tokens + <= 8
            assert length - now <= (length - before - answer) + 8 and now > before
        else:  # all but the tail of the previous prompt (its last, partial, small chunk)
            assert now >= before - 16 and now > 0


@pytest.mark.slow
def test_api_reuses_prompts_longer_than_a_big_chunk_and_answers_the_same(fast, default_model_path):
    """The API prefills by the prompt cache's own schedule: a prompt past a whole big chunk (256) is reused too.
    (It once prefilled in 512-token chunks while restoring by 256-token ones, so nothing past 256 tokens was
    ever reused, and its cache-off output differed from the server's.)"""
    import camelid
    from camelid.prompt_cache import BIG_CHUNK

    plain = camelid.load(default_model_path, cache_mb=0)
    first = fast.tokenizer.encode("The history of bread, told briefly. " * 40, bos=True)
    for ids in (first[: BIG_CHUNK + 44], first[: 2 * BIG_CHUNK + 30]):
        assert len(ids) > BIG_CHUNK
        want = plain.start(ids, max_tokens=6, sampling=GREEDY).run()
        fast.start(ids, max_tokens=6, sampling=GREEDY).run()  # into the cache (the longer prompt reuses the shorter)
        again = fast.start(ids, max_tokens=6, sampling=GREEDY).run()
        assert again.token_ids == want.token_ids
        assert again.cached_tokens >= len(ids) - 16  # all but the last small chunk, which holds the last token
        engine = Engine(fast.model, fast.tokenizer, max_concurrency=1, max_seq_len=1024)  # the server's schedule
        engine.start()
        try:
            served, _ = run(engine, [ids], 6, frozenset(), together=False)
        finally:
            engine.stop()
        assert served[0] == want.token_ids


def test_templates_that_defeat_reuse_are_named():
    from camelid.chat import BUILTIN, prefix_reuse_problem

    assert all(prefix_reuse_problem(t) is None for t in BUILTIN.values())
    dated = "{{ 'Today is ' + strftime_now('%d %b') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tools = "{% if tools %}TOOLS {% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    last_only = "{{ messages[-1]['content'] }}"
    assert "date" in prefix_reuse_problem(dated)
    assert "tool list" in prefix_reuse_problem(tools)
    assert "earlier turns" in prefix_reuse_problem(last_only)


@pytest.mark.slow
def test_two_conversations_interleaved_under_a_small_budget_answer_as_alone(fast):
    """Two chats, turns interleaved (a1 b1 a2 b2 a3 b3), with a budget below what both hold: each answer equals the
    cache-off answer, the cache still reuses turns, and cached blocks plus running KV never pass the budget."""
    tok = fast.tokenizer
    systems = ["You answer questions about boats. " * 6, "You answer questions about birds. " * 6]
    questions_of = [["Name a boat.", "How big is it?", "Who sails it?"], ["Name a bird.", "What does it eat?", "Where?"]]

    def chat(engine) -> tuple[list[list[int]], list[int]]:
        histories = [[{"role": "system", "content": s}] for s in systems]
        answers, cached = [], []
        for turn in range(3):
            for c in range(2):
                histories[c].append({"role": "user", "content": questions_of[c][turn]})
                ids = fast.encode_chat(histories[c])
                (out,), (hit,) = run(engine, [ids], 8, tok.stop_ids)
                answers.append(out)
                cached.append(hit)
                histories[c].append({"role": "assistant", "content": tok.decode(out)})
        return answers, cached

    off = Engine(fast.model, tok, max_concurrency=2, max_seq_len=512, prefill_chunk=64)
    off.start()
    try:
        want, _ = chat(off)
    finally:
        off.stop()
    probe = Engine(fast.model, tok, max_concurrency=2, max_seq_len=512, prefill_chunk=64)
    per_token = sum(nbytes for _, nbytes in probe._kv_per_position)
    store = BlockStore(260 * per_token)  # one conversation's turns fit beside a running request; both do not
    seen = []
    put = store.put

    def watched_put(key, block):
        put(key, block)
        seen.append(store.bytes + sum(store.running.values()))

    store.put = watched_put
    on = Engine(fast.model, tok, max_concurrency=2, max_seq_len=512, prefill_chunk=64,
                prompt_cache=PromptCache(store, "default", 64, 16))
    on.start()
    try:
        got, cached = chat(on)
    finally:
        on.stop()
    assert got == want
    assert store.evictions > 0 and any(cached[2:])  # the budget bit, and later turns still reused something
    assert seen and max(seen) <= store.capacity


def test_a_reply_is_filled_back_in_only_once_the_engine_has_been_idle(fast, monkeypatch):
    """A finished reply's chunks are computed back into the cache only after FILL_DELAY of idleness, so a client
    that sends its next request at once never waits behind a fill; once idle long enough, the fill runs and the next
    turn reuses the reply."""
    from camelid.serve import engine as engine_mod

    tok = fast.tokenizer
    prompt = questions(tok, 1)[0]
    monkeypatch.setattr(engine_mod, "FILL_DELAY", 3600.0)
    store = BlockStore(256 << 20)
    on = Engine(fast.model, tok, max_concurrency=2, max_seq_len=512, prefill_chunk=64,
                prompt_cache=PromptCache(store, "default", 64, 16))
    on.start()
    try:
        (reply,), _ = run(on, [prompt], 40, frozenset())  # no stop token: 40 tokens, whole chunks past the prompt
        before = len(store)
        for _ in range(20):  # the engine thread is idle now, with the reply's fill pending, and does not start it
            assert on._fills and not any(on.rows)
            time.sleep(0.01)
        assert len(store) == before
        monkeypatch.setattr(engine_mod, "FILL_DELAY", 0.0)
        with on.cond:
            on.cond.notify_all()
        deadline = time.time() + 120
        while (on._fills or any(on.rows)) and time.time() < deadline:
            time.sleep(0.05)
        assert len(store) > before  # the reply's whole chunks are kept
        (_,), (hit,) = run(on, [prompt + reply + tok.encode(" And then?")], 4, tok.stop_ids)
        assert hit >= (len(prompt) + len(reply)) // 16 * 16 - 16
        if on.prompt_cache.granular:  # to the token: the whole prompt and reply
            assert hit == len(prompt) + len(reply)
    finally:
        on.stop()
