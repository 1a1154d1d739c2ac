"""A tiny guard whose verdicts are known: a random tiny llama, fine-tuned here with camelid's own training loop on a
labelled set rendered in Llama Guard 3's prompt format, written back as a GGUF that `camelid serve --guard` loads.

The labels follow one rule the model learns: a user message naming a weapon ("bomb") is S1, one about stealing
("steal") is S2, anything else is safe; an answer (the Agent turn) is judged by the same words. The test prompts are
drawn from the same word lists, so the test knows every verdict before it asks.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from gguf_factory import Spec, vocab_from_tokenizers, write_gguf

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPEC = Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=512)
CODES = ("S1", "S2")  # the guard is trained (and served) with these two categories checked
SAFE_WORDS = ("cake", "song", "poem", "garden", "bread", "story", "kite", "map")
UNSAFE = {"S1": ("bomb",), "S2": ("steal",)}
VERBS = ("how do I make a", "tell me about a", "write a", "find me a", "I want a")


def bpe(texts: list[str]):
    """A byte-level BPE trained on the guard prompts themselves, so a prompt is ~100 tokens, not ~600 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(LLAMA3_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    v = vocab_from_tokenizers(tok, LLAMA3_SPECIALS)
    v.bos, v.eos = 0, 3  # <|begin_of_text|>, <|eot_id|>
    return v


def labelled(rng: random.Random, n: int) -> list[tuple[list[dict], str]]:
    """n (conversation, answer) pairs: about a third S1, a third S2, a third safe; half judge an Agent turn."""
    out = []
    for i in range(n):
        kind = ("S1", "S2", "safe")[i % 3]
        word = rng.choice(SAFE_WORDS) if kind == "safe" else rng.choice(UNSAFE[kind])
        text = f"{rng.choice(VERBS)} {word}"
        if i % 2:  # response classification: a harmless question, the answer carries the word
            chat = [{"role": "user", "content": f"{rng.choice(VERBS)} {rng.choice(SAFE_WORDS)}"},
                    {"role": "assistant", "content": f"sure, here is a {word}"}]
        else:
            chat = [{"role": "user", "content": text}]
        out.append((chat, "safe" if kind == "safe" else f"unsafe\n{kind}"))
    return out


def build(path: Path, steps: int = 150, seed: int = 0) -> Path:
    """Write the trained guard to path (a .gguf) and return it."""
    from camelid.formats import read
    from camelid.guard import DEFAULT_CATEGORIES, render_prompt
    from camelid.loader import build_model
    from camelid.train import loop
    from camelid.train.data import Batches, Sample

    cats = [c for c in DEFAULT_CATEGORIES if c.code in CODES]
    data = labelled(random.Random(seed), 96)
    texts = [render_prompt(chat, cats) + answer for chat, answer in data]
    texts += [render_prompt([{"role": "user", "content": " ".join(SAFE_WORDS + VERBS)}], DEFAULT_CATEGORIES)] * 3
    vocab = bpe(texts)
    raw = path.with_suffix(".random.gguf")
    write_gguf(raw, SPEC, vocab, seed=seed)
    ckpt = read(raw)
    tok = ckpt.tokenizer
    net = build_model(ckpt, quant=None)
    samples = []
    for chat, answer in data:
        prompt = tok.encode(render_prompt(chat, cats), special=True, bos=False)
        reply = tok.encode(answer, special=False, bos=False) + [tok.encode("<|eot_id|>", special=True, bos=False)[0]]
        samples.append(Sample(prompt + reply, [False] * len(prompt) + [True] * len(reply), "guard"))
    torch.manual_seed(seed)
    loop.make_trainable_copy(net)
    batches = Batches(samples, seq_len=SPEC.context_length, batch_size=8, pack=False, seed=seed)
    cfg = loop.TrainConfig(steps=steps, lr=3e-3, warmup_steps=10, precision="fp32", log_every=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is many times faster on one thread than on a busy machine's two
    try:
        loop.train(net, batches, cfg, path.parent / "guard-train", progress=False)
    finally:
        torch.set_num_threads(threads)
    weights = {k: v.detach().float().numpy() for k, v in net.state_dict().items()}
    write_gguf(path, SPEC, vocab, weights=weights)
    raw.unlink()
    return path
