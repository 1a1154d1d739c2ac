"""Training data: serving-prompt identity, trained-token masks, bad records, packing without cross-sample
attention, deterministic resumable rank-sharded batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_random_model

from camelid.chat import BUILTIN, encode_chat, render, template_for
from camelid.errors import CamelidError, DataError
from camelid.tokenizer import build_bpe, byte_decoder
from camelid.train.data import IGNORE, Batches, Sample, load_samples, split_validation

REPO = Path(__file__).resolve().parents[1]

CONVERSATION = [
    {"role": "user", "content": "Hi! Who are you?"},
    {"role": "assistant", "content": "A small model."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "A pear."},
]


@pytest.fixture(scope="module")
def smol():
    """The default model's tokenizer (its own chatml template with a default system prompt)."""
    from camelid.formats import read
    from camelid.store import DEFAULT_MODEL, resolve

    return read(resolve(DEFAULT_MODEL)).tokenizer


def byte_tokenizer(specials: list[str], bos: str, eos: str, add_bos: bool):
    """A byte-level vocabulary (no merges) with the given control tokens."""
    table = byte_decoder()
    tokens = sorted(table, key=table.get) + specials
    types = [1] * 256 + [3] * len(specials)
    return build_bpe(tokens, [], types, "default", tokens.index(bos), tokens.index(eos), add_bos)


def llama3_tokenizer():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return byte_tokenizer(specials, "<|begin_of_text|>", "<|end_of_text|>", add_bos=True)


def llama2_tokenizer():
    return byte_tokenizer(["<s>", "</s>"], "<s>", "</s>", add_bos=True)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(*messages: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def trained_spans(sample: Sample) -> list[tuple[int, int]]:
    spans, start = [], None
    for t, on in enumerate([*sample.trained, False]):
        if on and start is None:
            start = t
        if not on and start is not None:
            spans.append((start, t))
            start = None
    return spans


# --- the serving prompt, byte for byte ---


@pytest.mark.parametrize("which", ["default", "llama-3", "llama-2"])
@pytest.mark.parametrize("system", [None, "Answer in five words."])
def test_training_ids_are_the_serving_prompt_then_the_answer(tmp_path, smol, which, system):
    tok, template, end = {
        "default": (smol, None, "<|im_end|>"),
        "llama-3": (llama3_tokenizer(), BUILTIN["llama-3"], "<|eot_id|>"),
        "llama-2": (llama2_tokenizer(), BUILTIN["llama-2"], "</s>"),
    }[which]
    source = template or template_for(tok)[0]
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    (sample,), report = load_samples(path, tok, template, seq_len=512)
    assert report.kind == "chat" and report.records == 1 and report.split == 0 and sample.source == f"{path}:1"

    # the whole sample is the template's rendering of the conversation, byte for byte
    assert tok.decode_bytes(sample.ids, special=True) == render(source, messages, tok, add_generation_prompt=False).encode()
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = trained_spans(sample)
    assert len(spans) == len(answers) == 2 and not sample.trained[0]
    for i, (start, stop) in zip(answers, spans):
        # up to each answer: exactly the ids `camelid run/chat/serve` send as the prompt
        prompt = encode_chat(tok, messages[:i], source, add_generation_prompt=True)
        assert sample.ids[:len(prompt)] == prompt and start == len(prompt)
        # the trained tokens are the answer and the end-of-turn token (so the model learns to stop)
        assert tok.decode(sample.ids[start:stop], special=True).strip() == messages[i]["content"] + " " * (
            which == "llama-2") + end
        assert sample.ids[stop - 1] in tok.stop_ids
    assert report.trained_tokens == sum(sample.trained) == sum(b - a for a, b in spans)


def test_default_model_sample_matches_llm_encode_chat_with_a_system_prompt(tmp_path, smol):
    from camelid.api import LLM

    llm = LLM.__new__(LLM)  # only the prompt side of LLM: tokenizer and template, no weights
    llm.tokenizer, llm.chat_template = smol, template_for(smol)[0]
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("user", "Hello"), ("assistant", "Hi."))])
    (sample,), _ = load_samples(path, smol, llm.chat_template, seq_len=256, system="Be terse.")
    prompt = llm.encode_chat([{"role": "user", "content": "Hello"}], system="Be terse.")
    assert sample.ids[:len(prompt)] == prompt
    assert smol.decode(sample.ids[len(prompt):], special=True) == "Hi.<|im_end|>\n"


def test_system_option_does_not_replace_a_records_own_system_turn(tmp_path, smol):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("system", "Own."), ("user", "a"), ("assistant", "b"))])
    (sample,), _ = load_samples(path, smol, None, seq_len=256, system="Default.")
    text = smol.decode(sample.ids, special=True)
    assert text.startswith("<|im_start|>system\nOwn.<|im_end|>") and "Default." not in text


def test_instruction_records_render_as_a_user_and_an_assistant_turn(tmp_path, smol):
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "output": "Hi!", "system": "Be loud."},
    ])
    samples, report = load_samples(path, smol, None, seq_len=256)
    assert report.kind == "instruction" and report.records == 2
    same = write_jsonl(tmp_path / "c.jsonl", [
        chat(("user", "Translate to French.\n\ncat"), ("assistant", "chat")),
        chat(("system", "Be loud."), ("user", "Say hi."), ("assistant", "Hi!")),
    ])
    expected, _ = load_samples(same, smol, None, seq_len=256)
    assert [(s.ids, s.trained) for s in samples] == [(s.ids, s.trained) for s in expected]


def test_train_on_prompt_trains_every_token_after_the_first(tmp_path, smol):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(*[(m["role"], m["content"]) for m in CONVERSATION])])
    (masked,), _ = load_samples(path, smol, None, seq_len=512)
    (full,), report = load_samples(path, smol, None, seq_len=512, train_on_prompt=True)
    assert full.ids == masked.ids and full.trained == [False] + [True] * (len(full.ids) - 1)
    assert report.trained_tokens == len(full.ids) - 1 > sum(masked.trained)


def test_a_template_that_rewrites_history_gives_one_sample_per_turn(tmp_path, smol):
    # a template that drops earlier assistant answers (as reasoning templates drop their thoughts)
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [chat(*[(m["role"], m["content"]) for m in CONVERSATION])])
    samples, report = load_samples(path, smol, template, seq_len=512)
    assert report.split == 1 and report.records == 1 and len(samples) == 2
    for k, i in enumerate((1, 3)):
        prompt = encode_chat(smol, CONVERSATION[:i], template)
        (start, stop), = trained_spans(samples[k])
        assert samples[k].ids[:start] == prompt
        assert smol.decode(samples[k].ids[start:stop], special=True) == CONVERSATION[i]["content"] + "<|im_end|>"


# --- bad records and files ---

BAD = [
    ("not json", "not valid JSON"),
    ('["a list"]', "not a chat"),
    ({"prompt": "x"}, "not a chat"),
    ({"messages": []}, "non-empty list"),
    (chat(("user", "a")), "no assistant turn"),
    (chat(("user", "a"), ("tool", "b")), "role 'tool'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "string 'content'"),
    (chat(("user", "   "), ("assistant", "b")), "empty content"),
    (chat(("assistant", "a")), "must start with a user turn"),
    (chat(("user", "a"), ("system", "s"), ("assistant", "b")), "system turn can only come first"),
    ({"text": "a document"}, "a text record in a file of chat records"),
]


@pytest.mark.parametrize("record,reason", BAD)
def test_a_bad_record_names_file_and_line(tmp_path, smol, record, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("user", "q"), ("assistant", "a")), record,
                                              chat(("user", "q2"), ("assistant", "a2"))])
    with pytest.raises(DataError, match=reason) as e:
        load_samples(path, smol, None, seq_len=256)
    assert str(e.value).startswith(f"{path}:2: ") and "\n" not in str(e.value)
    samples, report = load_samples(path, smol, None, seq_len=256, skip_bad=True)
    assert (report.records, report.skipped, len(samples)) == (2, 1, 2)
    assert report.problems[0].startswith(f"{path}:2: ") and [s.source for s in samples] == [f"{path}:1", f"{path}:3"]


def test_instruction_record_without_output(tmp_path, smol):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing 'output'"):
        load_samples(path, smol, None, seq_len=256)


def test_the_template_refusing_a_conversation_is_a_bad_record(tmp_path):
    tok = llama2_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("user", "a"), ("user", "b"), ("assistant", "c"))])
    with pytest.raises(DataError, match="d.jsonl:1: .*alternate"):
        load_samples(path, tok, BUILTIN["llama-2"], seq_len=256)


def test_a_record_longer_than_seq_len_is_never_cut(tmp_path, smol):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("user", "short"), ("assistant", "ok")),
                                              chat(("user", "long " * 100), ("assistant", "ok"))])
    n = len(encode_chat(smol, chat(("user", "long " * 100), ("assistant", "ok"))["messages"], add_generation_prompt=False))
    with pytest.raises(DataError, match=f"d.jsonl:2: record is {n} tokens, longer than seq_len 64"):
        load_samples(path, smol, None, seq_len=64)
    samples, report = load_samples(path, smol, None, seq_len=64, skip_bad=True)
    assert len(samples) == 1 and report.too_long == report.skipped == 1


def test_wrong_files_are_one_line_errors(tmp_path, smol, default_model_path):
    cases = {
        "empty.jsonl": b"", "blank.jsonl": b"\n  \n", "data.csv": b"question,answer\nq,a\n",
        "binary.jsonl": b"\x00\x01\x02", "empty.txt": b"  \n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for path, reason in [(tmp_path / "empty.jsonl", "is empty"), (tmp_path / "blank.jsonl", "is empty"),
                         (tmp_path / "data.csv", "is a CSV file"), (tmp_path / "binary.jsonl", "is a binary file"),
                         (tmp_path / "empty.txt", "is empty"), (default_model_path, "is a GGUF model"),
                         (tmp_path / "missing.jsonl", "no such data file")]:
        with pytest.raises(DataError, match=reason) as e:
            load_samples(path, smol, None, seq_len=64)
        assert "\n" not in str(e.value) and isinstance(e.value, CamelidError)
    with pytest.raises(DataError, match="no usable records"):
        load_samples(write_jsonl(tmp_path / "allbad.jsonl", ["{", "["]), smol, None, seq_len=64, skip_bad=True)


def test_json_array_files_name_the_line_each_record_starts_on(tmp_path, smol):
    path = tmp_path / "alpaca.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "output": ""}\n]\n')
    with pytest.raises(DataError, match=r"alpaca.json:3: 'output' is empty"):
        load_samples(path, smol, None, seq_len=64)
    samples, report = load_samples(path, smol, None, seq_len=64, skip_bad=True)
    assert report.kind == "instruction" and samples[0].source == f"{path}:2"


# --- plain text ---


def test_text_documents_get_eos_and_long_ones_are_split_with_every_token_trained_once(tmp_path, smol):
    long_text = " ".join(f"word{i}" for i in range(300))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "A short document."}, {"text": long_text}])
    samples, report = load_samples(path, smol, None, seq_len=64)
    assert report.kind == "text" and report.records == 2 and report.chunked == 1
    assert samples[0].ids == smol.encode("A short document.") + [smol.eos_id]
    assert samples[0].trained == [False] + [True] * (len(samples[0].ids) - 1)
    doc = smol.encode(long_text) + [smol.eos_id]
    pieces = samples[1:]
    assert all(len(p.ids) <= 64 and p.source == f"{path}:2" for p in pieces) and len(pieces) > 1
    targets = []  # (index in the document) of every trained token, over all pieces
    offset = 0
    for p in pieces:
        assert p.ids == doc[offset: offset + len(p.ids)]
        targets += [offset + t for t, on in enumerate(p.trained) if on]
        offset += len(p.ids) - 1
    assert targets == list(range(1, len(doc)))
    assert report.trained_tokens == len(samples[0].ids) - 1 + len(doc) - 1


def test_a_txt_file_is_one_document_with_sources_by_line(tmp_path):
    tok = llama2_tokenizer()  # with BOS
    path = tmp_path / "book.txt"
    path.write_text("line one\n" * 20)
    samples, report = load_samples(path, tok, None, seq_len=50)
    assert samples[0].ids[0] == tok.bos_id and samples[-1].ids[-1] == tok.eos_id and report.chunked == 1
    assert [s.source for s in samples[:3]] == [f"{path}:1", f"{path}:6", f"{path}:11"]  # 49 new bytes a piece


# --- batches ---


def make_samples(n: int, seed: int = 0, longest: int = 40) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, longest + 1, (1,), generator=g))
        ids = torch.randint(1, 50, (length,), generator=g).tolist()
        trained = [False] + (torch.rand(length - 1, generator=g) < 0.6).tolist()
        out.append(Sample(ids, trained, f"f:{i + 1}"))
    return out


def unpack(batch) -> list[tuple[list[int], list[int]]]:
    """(tokens, targets) of each sample in a packed batch, read back through segments and positions."""
    out = []
    for b in range(batch.tokens.shape[0]):
        seg = batch.segments[b]
        for s in seg.unique().tolist():
            where = (seg == s).nonzero().flatten()
            assert torch.equal(batch.positions[b, where], torch.arange(len(where)))
            if (batch.targets[b, where] == IGNORE).all() and (batch.tokens[b, where] == 0).all():
                continue  # padding
            out.append((batch.tokens[b, where].tolist(), batch.targets[b, where].tolist()))
    return out


def expected_targets(s: Sample) -> list[int]:
    return [t if on else IGNORE for t, on in zip(s.ids[1:], s.trained[1:])] + [IGNORE]


def test_packing_keeps_samples_whole_in_rows_of_seq_len(tmp_path):
    samples = make_samples(50)
    batches = Batches(samples, seq_len=64, batch_tokens=256)
    assert batches.rows_per_batch == 4
    assert sorted(i for row in batches.rows for i in row) == list(range(50))
    assert all(sum(len(samples[i].ids) for i in row) <= 64 for row in batches.rows)
    it = iter(batches)
    seen = []
    for _ in range(batches.steps_per_epoch):
        batch = next(it)
        assert batch.tokens.shape[1] <= 64 and batch.tokens.shape[0] <= 4
        assert batch.n_targets == int((batch.targets != IGNORE).sum())
        seen += unpack(batch)
    assert batches.epoch == 0
    expected = sorted((s.ids, expected_targets(s)) for s in samples)
    assert sorted(seen) == expected  # every sample once an epoch, with its own targets


def test_padding_mode_is_one_sample_a_row(tmp_path):
    samples = make_samples(10)
    batches = Batches(samples, seq_len=64, batch_size=3, pack=False, shuffle=False)
    assert batches.steps_per_epoch == 4
    batch = next(iter(batches))
    assert batch.segments is None and batch.tokens.shape == (3, max(len(s.ids) for s in samples[:3]))
    for b, s in enumerate(samples[:3]):
        n = len(s.ids)
        assert batch.tokens[b, :n].tolist() == s.ids and batch.targets[b, :n].tolist() == expected_targets(s)
        assert (batch.targets[b, n:] == IGNORE).all()
    assert batch.n_tokens == sum(len(s.ids) for s in samples[:3])


def take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "targets", "positions", "segments"))


def test_batches_are_deterministic_reshuffled_each_epoch_and_resume_exactly():
    samples = make_samples(40)
    opts = dict(seq_len=64, batch_tokens=128, seed=3)
    per_epoch = Batches(samples, **opts).steps_per_epoch
    run = take(Batches(samples, **opts), 3 * per_epoch)
    assert all(same(a, b) for a, b in zip(run, take(Batches(samples, **opts), 3 * per_epoch)))
    first, second = run[:per_epoch], run[per_epoch: 2 * per_epoch]
    assert not all(same(a, b) for a, b in zip(first, second))  # another order in epoch 1
    assert not all(same(a, b) for a, b in zip(first, take(Batches(samples, **{**opts, "seed": 4}), per_epoch)))
    for cut in (1, per_epoch, per_epoch + 2):  # mid-epoch and at an epoch's end
        batches = Batches(samples, **opts)
        take(batches, cut)
        state = json.loads(json.dumps(batches.state_dict()))  # survives a JSON checkpoint
        resumed = Batches(samples, **opts)
        resumed.load_state_dict(state)
        assert all(same(a, b) for a, b in zip(take(resumed, 3), run[cut: cut + 3]))
    with pytest.raises(DataError, match="other data"):
        Batches(make_samples(40, seed=9), **opts).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_micro_batches_and_the_same_number(world):
    samples = make_samples(30)
    opts = dict(seq_len=64, batch_tokens=64, seed=1)
    one = take(Batches(samples, **opts), Batches(samples, **opts).steps_per_epoch)
    ranks = [Batches(samples, **opts, rank=r, world=world) for r in range(world)]
    steps = ranks[0].steps_per_epoch
    assert all(b.steps_per_epoch == steps for b in ranks) and steps == -(-len(one) // world)
    got = [take(b, steps) for b in ranks]
    for k in range(steps):  # global micro-batch k * world + r is rank r's k-th: the order of one process
        for r in range(world):
            assert same(got[r][k], one[(k * world + r) % len(one)])  # wrapped at the end, never dropped


def test_split_validation_holds_out_whole_records():
    samples = make_samples(20) + [Sample([1, 2], [False, True], "f:20")]  # a second piece of record f:20
    train, val = split_validation(samples, 0.25, seed=0)
    assert len({s.source for s in val}) == 5 and not {s.source for s in train} & {s.source for s in val}
    assert sorted(map(id, train + val)) == sorted(map(id, samples))
    assert [s.source for s in split_validation(samples, 0.25, seed=0)[1]] == [s.source for s in val]
    with pytest.raises(DataError):
        split_validation(samples[:1], 0.5, seed=0)


# --- packed attention in the model ---


tiny_model = tiny_random_model  # shared with tests/test_embed.py


def test_a_packed_row_gives_each_sample_the_logits_it_has_alone():
    model = tiny_model()
    samples = make_samples(6, seed=5, longest=20)
    batch = next(iter(Batches(samples, seq_len=64, batch_size=2, shuffle=False)))
    with torch.no_grad():
        packed = model(batch.tokens, batch.positions, segments=batch.segments)
        plain = model(batch.tokens, batch.positions)  # positions restart, but attention crosses samples
    checked = 0
    for b in range(batch.tokens.shape[0]):
        for s in batch.segments[b].unique().tolist():
            where = (batch.segments[b] == s).nonzero().flatten()
            if (batch.targets[b, where] == IGNORE).all() and (batch.tokens[b, where] == 0).all():
                continue
            with torch.no_grad():
                alone = model(batch.tokens[b, where][None])[0]
            torch.testing.assert_close(packed[b, where], alone, rtol=1e-5, atol=1e-5)
            if s > 0:
                assert not torch.allclose(plain[b, where], alone, atol=1e-3)  # the mask is what makes it so
                checked += 1
    assert checked >= 2
    # and it trains: the masked attention has a gradient, finite even at the padding's own segment
    logits = model(batch.tokens, batch.positions, segments=batch.segments)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_segments_need_whole_sequences():
    from camelid.cache import KVCache

    model = tiny_model()
    cache = KVCache.__new__(KVCache)
    with pytest.raises(ValueError, match="segments"):
        model(torch.zeros(1, 4, dtype=torch.long), segments=torch.zeros(1, 4, dtype=torch.long), cache=cache)


# --- the shipped example ---


def test_the_facts_example_loads_and_validation_asks_new_questions(smol):
    train, train_report = load_samples(REPO / "examples/facts/train.jsonl", smol, None, seq_len=256)
    val, val_report = load_samples(REPO / "examples/facts/val.jsonl", smol, None, seq_len=256)
    assert 30 <= train_report.records <= 60 and 8 <= val_report.records <= 12
    assert train_report.skipped == val_report.skipped == 0

    def pairs(path):
        rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
        return [(m[0]["content"], m[1]["content"]) for m in rows]

    train_pairs, val_pairs = pairs(REPO / "examples/facts/train.jsonl"), pairs(REPO / "examples/facts/val.jsonl")
    assert not {q for q, _ in val_pairs} & {q for q, _ in train_pairs}  # paraphrases, not copies
    assert {a for _, a in val_pairs} == {a for _, a in train_pairs}  # one consistent answer per fact
