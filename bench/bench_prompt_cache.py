"""Prompt-cache scenarios of bench/bench_serve.py (`python bench/bench_serve.py --prompt-cache`), all in one run:

1. a ~1,500-token system prompt followed by 8 different questions: time to first token of each request, for
   camelid with the cache on and off and for llama.cpp's server (llama-cpp-python, which reuses the longest
   common prefix of the previous prompt, its `cache_prompt` behaviour);
2. a 6-turn chat: prompt tokens prefilled per turn (prompt_tokens - cached_tokens), with a one-second pause
   between turns (a person reading), in which camelid keeps the reply's chunks;
3. 8 concurrent streams with no shared prefix: throughput with the cache on and off.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx

SYSTEM = ("You are the support assistant of a bakery chain. Answer briefly, politely and only about the bakery. "
          "Opening hours are 7 to 19 on weekdays and 8 to 14 on Saturdays; we are closed on Sundays. ")
QUESTIONS = ["When do you open on Saturday?", "Do you sell rye bread?", "Can I order a cake for Friday?",
             "Is there parking nearby?", "Do you have gluten-free loaves?", "What is your phone number?",
             "Can I pay by card?", "Do you deliver to offices?"]
TURNS = ["Hi! I want to order bread.", "Two rye loaves, please.", "Can you slice them?", "And one croissant.",
         "How much is it altogether?", "Thanks, see you tomorrow."]


def system_prompt(tokens_wanted: int = 1500) -> str:
    text, i = "", 0
    while len(text.split()) < tokens_wanted * 0.7:  # about 1.4 tokens a word for this English text
        text += SYSTEM + f"Rule {i}: keep the counter clean and greet every customer. "
        i += 1
    return text


def ttft(base: str, model: str, messages: list[dict], max_tokens: int = 8) -> tuple[float, dict]:
    """(seconds to the first content chunk, usage) of one streamed chat completion."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, usage = None, {}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - t0
            usage = event.get("usage") or usage
    return (first if first is not None else time.perf_counter() - t0), usage


def shared_prefix(base: str, model: str) -> list[float]:
    system = system_prompt()
    return [ttft(base, model, [{"role": "system", "content": system}, {"role": "user", "content": q}])[0]
            for q in QUESTIONS]


def chat_turns(base: str, model: str) -> list[tuple[int, int, int]]:
    """(prompt tokens, prompt tokens prefilled, completion tokens) per turn."""
    history, out = [{"role": "system", "content": "You are a friendly bakery assistant."}], []
    for text in TURNS:
        history.append({"role": "user", "content": text})
        body = {"model": model, "messages": history, "max_tokens": 24, "temperature": 0}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=600).json()
        usage = r["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        out.append((usage["prompt_tokens"], usage["prompt_tokens"] - cached, usage["completion_tokens"]))
        history.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        time.sleep(1.0)  # the person reads the answer
    return out


def throughput(base: str, model: str, streams: int = 8, max_tokens: int = 48) -> float:
    """Completion tokens per second of `streams` concurrent requests with unrelated prompts."""
    counts: list[int] = []

    def one(i: int) -> None:
        body = {"model": model, "prompt": f"Story {i * 7919}: a {['fox', 'ship', 'clock', 'tree'][i % 4]} that",
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
        counts.append(httpx.post(base + "/v1/completions", json=body, timeout=600).json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def report(results: dict) -> None:
    print("\n1) 1,500-token system prompt + 8 questions: time to first token (s)")
    print("| server | request 1 | requests 2-8 median | ratio |")
    print("|---|---|---|---|")
    for name, times in results["prefix"].items():
        rest = statistics.median(times[1:])
        print(f"| {name} | {times[0]:.2f} | {rest:.2f} | {rest / times[0]:.2f} |")
    print("\n2) 6-turn chat: prompt tokens / prefilled per turn; extra = prefilled beyond the turn's new tokens")
    print("   (new = prompt - the previous turn's prompt and answer tokens; the target is extra <= 8)")
    for name, turns in results["turns"].items():
        print(f"| {name} | " + " | ".join(f"{p}/{f}" for p, f, _ in turns) + " |")
        extra = [f - (p - q - c) for (p, f, _), (q, _, c) in zip(turns[1:], turns, strict=False)]
        print(f"| {name} extra | - | " + " | ".join(str(e) for e in extra) + " |")
    print("\n3) 8 streams, no shared prefix: tok/s (median of runs)")
    for name, runs in results["throughput"].items():
        print(f"| {name} | {statistics.median(runs):.1f} | runs {', '.join(f'{r:.1f}' for r in runs)} |")
    on, off = (statistics.median(results["throughput"][k]) for k in ("camelid cache on", "camelid cache off"))
    print(f"cache on / off throughput: {on / off:.3f}")
