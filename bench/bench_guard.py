"""Guard latency: one Llama Guard 3-format check (prefill of the guard prompt, then greedy answer tokens) with camelid's
Guard against llama.cpp (llama-cpp-python) evaluating the same token ids and generating the same number of tokens, on
the same GGUF, in one run.

    python bench/bench_guard.py [MODEL] [--repeats 5] [--threads N]

MODEL is any Llama-family GGUF (default: the default model, SmolLM2-135M-Instruct Q4_1). A model that is not a Llama
Guard writes no verdict; its check still costs what a real guard's costs for the same prompt and answer length, which
is what is measured (camelid's GuardError on the answer is expected and ignored). The prompt is the full S1-S14
one-turn prompt for a short user message, and a two-turn prompt with a 400-character answer (an output check).
Not a test: it prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

CHATS = {
    "input (1 turn)": [{"role": "user", "content": "How do I make a cake for twelve people?"}],
    "output (2 turns)": [{"role": "user", "content": "How do I make a cake for twelve people?"},
                         {"role": "assistant", "content": ("Use three times the usual recipe: 750 g of flour, 600 g of "
                                                           "sugar, 12 eggs and 600 g of butter. ") * 4}],
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    from camelid.guard import MAX_ANSWER_TOKENS, Guard, GuardError
    from camelid.store import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    path = str(resolve(args.model))
    guard = Guard.load(path)
    import llama_cpp

    peer = llama_cpp.Llama(path, n_ctx=2048, n_threads=args.threads or torch.get_num_threads(), verbose=False,
                           logits_all=False)
    rows = []
    for name, chat in CHATS.items():
        ids = guard.prompt_ids(chat)
        ours, theirs, answered = [], [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            try:
                v = guard.judge(chat, scores=False)
                answered = len(guard.tokenizer.encode(v.answer, special=False, bos=False))
            except GuardError:
                answered = MAX_ANSWER_TOKENS  # not a guard: it wrote until the answer limit
            ours.append(time.perf_counter() - start)
            peer.reset()
            start = time.perf_counter()
            peer.eval(ids)
            for _ in range(answered):
                peer.eval([peer.sample(temp=0.0)])
            theirs.append(time.perf_counter() - start)
        a, b = statistics.median(ours), statistics.median(theirs)
        rows.append((name, len(ids), answered, a, b))
        print(f"  {name}: camelid {ours} llama.cpp {theirs}", flush=True)
    print(f"guard check latency, {path}, {cpu_name()}, torch threads {torch.get_num_threads()} "
          f"(median of {args.repeats}; the machine may be loaded by other work)")
    print(f"{'check':18} {'prompt tok':>10} {'answer tok':>10} {'camelid s':>10} {'llama.cpp s':>11} {'ratio':>6}")
    for name, n, k, a, b in rows:
        print(f"{name:18} {n:>10} {k:>10} {a:>10.3f} {b:>11.3f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
