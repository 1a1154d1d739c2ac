"""Speculative decoding's speed-up, on an input-grounded task and on open-ended text, plain decoding measured in the
same run on the same model.

    python bench/bench_speculate.py [--model PATH] [--draft PATH] [--max-tokens 128] [--repeats 3] [--threads 2] [--engine]

Tasks (greedy, chat template): "edit" rewrites a given paragraph with one change (the answer copies most of its
input: where prompt lookup pays), "code" adds a docstring to a given function, "open" writes a story from a one-line
request (nothing to copy: speculation must not cost more than 5% there). Drafters: ngram (prompt lookup) and, with
--draft, a draft model (here the only real weights are the default model, so a Q8_0/Q4_0 copy of it against its
Q4_1 or F16 self tests the mechanism, not a realistic small-draft speed-up). Each cell: tokens/s, median over
--repeats; the outputs are checked to be identical to plain decoding's. The machine is named; it may be shared.
--engine runs every cell through the server's continuous-batching engine (camelid/serve/engine.py, one request at a
time, the prompt cache off), as `camelid serve --speculate ngram|MODEL` decodes, instead of camelid.generate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TEXT = ("The old lighthouse stood at the end of a narrow spit of land, where the river met the sea and the water "
        "changed colour from brown to grey. For more than a century its lamp had turned every night, and the ships "
        "that passed had learned to trust it the way a traveller trusts a familiar road.")
CODE = '''def moving_average(values, window):
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
'''
TASKS = {
    "edit": f"Repeat the following paragraph exactly, but replace the word 'lighthouse' with 'tower':\n\n{TEXT}",
    "code": f"Add a docstring to this Python function and return the whole function:\n\n{CODE}",
    "open": "Write a short story about a fox who learns to sail.",
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft", default=None, help="a draft model file (same vocabulary)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", action="store_true", help="through the server's engine, as camelid serve decodes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from camelid import bench, load
    from camelid.generate import Request, generate_one
    from camelid.sampling import GREEDY
    from camelid.speculate import ModelDrafter, NgramDrafter, generate_speculative

    llm = load(args.model)
    drafters = {"ngram": NgramDrafter()}
    if args.draft:
        drafters["draft"] = ModelDrafter(load(args.draft).model)
    m = bench.machine()
    engine = None
    if args.engine:
        from camelid.serve.engine import Engine

        engine = Engine(llm.model, llm.tokenizer, max_concurrency=1, max_seq_len=2048,
                        draft_model=drafters["draft"].model if "draft" in drafters else None)
        engine.start()
    print(f"# {llm.checkpoint.path.name}{' through the server engine' if engine else ''}; draft {args.draft or '-'}; "
          f"greedy, {args.max_tokens} tokens at most; "
          f"CPU {m['cpu']}, {args.threads} threads; medians of {args.repeats}, interleaved; machine shared with other work")
    print("| task | plain tok/s | " + " | ".join(f"{d} tok/s | {d} speed-up | {d} same output" for d in drafters) + " |")
    print("|---|---|" + "---|---|---|" * len(drafters))
    for task, prompt in TASKS.items():
        req = Request(llm.encode_chat([{"role": "user", "content": prompt}]), args.max_tokens, GREEDY, llm.tokenizer.stop_ids)

        def served(req, speculate):
            return collect(engine, req, speculate)

        runs = {"plain": lambda req=req: served(req, "none") if engine else generate_one(llm.model, req)}
        for name, d in drafters.items():
            runs[name] = (lambda d=d, req=req, name=name: served(req, name) if engine
                          else generate_speculative(llm.model, req, d))
        times: dict[str, list[float]] = {name: [] for name in runs}
        outs: dict[str, list[int]] = {}
        for _ in range(args.repeats):  # interleaved, so a drift in the machine's speed favours none of them
            for name, run in runs.items():
                t = time.perf_counter()
                outs[name] = list(run())
                times[name].append(time.perf_counter() - t)
        rate = {name: len(outs[name]) / statistics.median(times[name]) for name in runs}
        cells = [f"{rate['plain']:.1f}"]
        for name in drafters:
            cells += [f"{rate[name]:.1f}", f"{rate[name] / rate['plain']:.2f}x",
                      "yes" if outs[name] == outs["plain"] else "NO"]
        print(f"| {task} | " + " | ".join(cells) + " |", flush=True)
    if engine is not None:
        engine.stop()


def collect(engine, req, speculate: str) -> list[int]:
    """One request through the engine, waited for: its token ids."""
    import threading

    from camelid.serve.engine import Finish, make_sequence

    ids, done = [], threading.Event()

    def emit(event):
        if isinstance(event, Finish):
            done.set()
        else:
            ids.append(event.id)

    engine.submit(make_sequence(req.prompt, req.max_tokens, emit, stop_ids=req.stop_ids, speculate=speculate))
    done.wait()
    return ids


if __name__ == "__main__":
    main()
