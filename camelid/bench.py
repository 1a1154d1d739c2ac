"""`camelid bench`: load time, time to first token, prefill (pp512) and decode (tg128) speed, peak RSS.

llama-bench style: random prompt tokens, medians over repeats. Every engine runs in a process of its own (so
peak RSS is its own), on the same file with the same threads: camelid, and with --vs the peers that are
installed (llama.cpp through llama-cpp-python, Hugging Face transformers dequantizing the GGUF to float32).
Time to first token is taken from the outside: from starting a command to reading its first token on stdout,
with `camelid run` itself for camelid. camelid loads as `camelid run` does, mapping the converted model that an
earlier load kept in the store (camelid/converted.py; the first load of a file converts, about half a second more).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ("llama.cpp", "transformers")
KEYS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")
TTFT_PROMPT = "What is the capital of France?"
DEPTHS = (100, 2000)  # cache positions at which decode is also timed (attention must cost the filled prefix only)
DEEP_STEPS = 16


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]  # llama-bench style: random ids, no specials


# ------------------------------------------------------------------ workers (one engine per process)

def _worker_camelid(path: str, threads: int, pp: int, tg: int, repeats: int, quant: str | None) -> dict:
    import torch

    from .cache import KVCache
    from .compiled import attach, step_for
    from .formats import read
    from .heap import keep_freed_heap
    from .loader import build_model

    keep_freed_heap()  # as camelid's commands run (camelid/heap.py)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ckpt = read(path)
    model = build_model(ckpt, quant=quant, reuse=True)  # as `camelid run` loads: the converted model once kept
    load_s = time.perf_counter() - t0
    attach(model, path, quant, wait=True)  # the compiled decode step when `camelid compile` built one
    step = step_for(model) or (lambda tok, pos, cache: model(tok, pos, cache)[:, -1])
    vocab = ckpt.config.vocab_size
    prompt = torch.tensor([_tokens(pp, vocab)])
    pp_times, tg_times = [], []

    def decode(cache, start: int, n: int) -> float:  # seconds for n greedy steps from position `start`
        logits = model(prompt[:, :1], torch.tensor([[start - 1]]), cache)[:, -1]
        t = time.perf_counter()
        for i in range(n):
            logits = step(logits.argmax(-1, keepdim=True), torch.tensor([[start + i]]), cache)
        return time.perf_counter() - t

    with torch.inference_mode():
        last = torch.tensor([pp - 1])
        model(prompt, None, KVCache.for_model(model, 1, pp), logits_at=last)  # warm-up, as llama-bench does
        for _ in range(repeats):
            cache = KVCache.for_model(model, 1, pp)
            t = time.perf_counter()
            model(prompt, None, cache, logits_at=last)
            pp_times.append(time.perf_counter() - t)
        for _ in range(repeats):
            tg_times.append(decode(KVCache.for_model(model, 1, tg + 1), 1, tg))
        peak = _rss_mb()  # after the work the peers do too (pp512, tg128), before the deep caches
        # decode deep in the context: the cache filled to DEPTHS (random keys), capacity 4096 either way
        deep = {}
        for depth in DEPTHS:
            cache = KVCache.for_model(model, 1, 4096)
            for start in range(0, depth, 512):
                ids = torch.tensor([_tokens(min(512, depth - start), vocab, seed=start)])
                model(ids, torch.arange(start, start + ids.shape[1])[None], cache, logits_at=torch.tensor([0]))
            deep[depth] = DEEP_STEPS / statistics.median(decode(cache, depth, DEEP_STEPS) for _ in range(repeats))
    return {"load_s": load_s, "prefill_tok_s": pp / statistics.median(pp_times),
            "decode_tok_s": tg / statistics.median(tg_times), "peak_rss_mb": peak, "peak_rss_deep_mb": _rss_mb(),
            "compiled": step_for(model) is not None, **{f"decode_at_{d}_tok_s": v for d, v in deep.items()}}


def _worker_llama_cpp(path: str, threads: int, pp: int, tg: int, repeats: int, quant: str | None) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=max(pp, tg + 1) + 8, n_batch=pp, n_ubatch=pp, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    prompt = _tokens(pp, llm.n_vocab())
    pp_times, tg_times = [], []
    llm.reset()
    llm.eval(prompt)  # warm-up
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pp_times.append(time.perf_counter() - t)
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt[:1])
        t = time.perf_counter()
        for _ in range(tg):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        tg_times.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_tok_s": pp / statistics.median(pp_times),
            "decode_tok_s": tg / statistics.median(tg_times), "peak_rss_mb": _rss_mb(), "version": _version("llama_cpp")}


def _worker_transformers(path: str, threads: int, pp: int, tg: int, repeats: int, quant: str | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    p = Path(path)
    t0 = time.perf_counter()
    if p.is_file():  # transformers dequantizes a GGUF to float32
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([_tokens(pp, model.config.vocab_size)])
    pp_times, tg_times = [], []
    with torch.inference_mode():
        model(prompt)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(prompt, logits_to_keep=1)
            pp_times.append(time.perf_counter() - t)
        for _ in range(repeats):
            out = model(prompt[:, :1], use_cache=True)
            past = out.past_key_values
            t = time.perf_counter()
            for _ in range(tg):
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
            tg_times.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_tok_s": pp / statistics.median(pp_times),
            "decode_tok_s": tg / statistics.median(tg_times), "peak_rss_mb": _rss_mb(), "version": _version("transformers")}


def _first_token_llama_cpp(path: str, threads: int) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_threads=threads, verbose=False)
    msgs = [{"role": "user", "content": TTFT_PROMPT}]
    for chunk in llm.create_chat_completion(msgs, max_tokens=1, temperature=0, stream=True):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            print(delta, flush=True)
            return


def _first_token_transformers(path: str, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    p = Path(path)
    kw = {"gguf_file": p.name} if p.is_file() else {}
    where = str(p.parent if p.is_file() else p)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": TTFT_PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.inference_mode():
        print(tok.decode(model(ids).logits[0, -1].argmax()), flush=True)


WORKERS = {"camelid": _worker_camelid, "llama.cpp": _worker_llama_cpp, "transformers": _worker_transformers}
FIRST_TOKEN = {"llama.cpp": _first_token_llama_cpp, "transformers": _first_token_transformers}


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version({"llama_cpp": "llama-cpp-python"}.get(module, module))
    except PackageNotFoundError:
        return None


def available(engine: str) -> bool:
    import importlib.util

    return engine == "camelid" or importlib.util.find_spec({"llama.cpp": "llama_cpp"}.get(engine, engine)) is not None


# ------------------------------------------------------------------ the parent: run workers, take medians

def _run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "camelid.bench", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"bench worker {args[0]} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_to_first_token(engine: str, path: str, threads: int, quant: str | None) -> float:
    """Seconds from starting the command to its first token on stdout (warm file cache: run after a load)."""
    if engine == "camelid":
        cmd = [sys.executable, "-m", "camelid", "run", path, TTFT_PROMPT, "--max-tokens", "1", "--temperature", "0",
               "--threads", str(threads)]
        cmd += ["--reference"] if quant is None else ["--quant", quant]
    else:
        cmd = [sys.executable, "-m", "camelid.bench", "first-token", engine, path, str(threads)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t
    _, err = proc.communicate()
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{engine}: no first token ({(err.strip().splitlines() or ['?'])[-1]})")
    return elapsed


def measure(engine: str, path: str, threads: int, repeats: int = 3, pp: int = 512, tg: int = 128,
            quant: str | None = "auto", progress=None) -> dict:
    """One engine's figures: medians over `repeats` (load and first token: separate processes each time)."""
    runs = []
    for i in range(repeats):
        if progress:
            progress(f"{engine}: run {i + 1}/{repeats}")
        runs.append(_run_worker(["worker", engine, path, str(threads), str(pp), str(tg), "1", str(quant)]))
    firsts = [time_to_first_token(engine, path, threads, quant) for _ in range(repeats)]
    numbers = [k for k in runs[0] if k in KEYS or k.startswith("decode_at_") or k == "peak_rss_deep_mb"]
    out = {k: statistics.median(r[k] for r in runs) for k in numbers}
    if "compiled" in runs[0]:
        out["compiled"] = runs[0]["compiled"]
    out["ttft_s"] = statistics.median(firsts)
    if runs[0].get("version"):
        out["version"] = runs[0]["version"]
    return {k: out[k] for k in (*KEYS, *numbers, "version", "compiled") if k in out}


def machine() -> dict:
    import platform

    import torch

    from .cpu import cpu_flags, cpu_model

    flags, cpu = cpu_flags(), cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "avx512": "avx512f" in flags, "amx": "amx_tile" in flags, "cuda": torch.cuda.is_available()}


def run(path: str, threads: int, vs: list[str], repeats: int = 3, quant: str | None = "auto", progress=None) -> dict:
    result = {"model": str(path), "threads": threads, "repeats": repeats, "quant": quant or "reference", **measure(
        "camelid", path, threads, repeats, quant=quant, progress=progress)}
    result["machine"] = machine()
    for peer in vs:
        if not available(peer):
            result[peer] = {"error": "not installed (pip install 'camelid[bench]')" if peer == "llama.cpp"
                            else "not installed (pip install transformers)"}
            continue
        try:
            figures = measure(peer, path, threads, repeats, progress=progress)
        except RuntimeError as e:
            result[peer] = {"error": str(e)}
            continue
        # ratios > 1 mean camelid is better: speeds camelid/peer, times and memory peer/camelid
        figures["ratio"] = {
            "prefill": result["prefill_tok_s"] / figures["prefill_tok_s"],
            "decode": result["decode_tok_s"] / figures["decode_tok_s"],
            "load": figures["load_s"] / result["load_s"],
            "ttft": figures["ttft_s"] / result["ttft_s"],
            "rss": figures["peak_rss_mb"] / result["peak_rss_mb"],
        }
        result[peer] = figures
    return result


def table(result: dict) -> str:
    engines = [("camelid", result)] + [(p, result[p]) for p in PEERS if p in result]
    rows = [f"{'engine':14} {'load s':>8} {'ttft s':>8} {'pp512 t/s':>10} {'tg128 t/s':>10} {'RSS MB':>8}"]
    for name, r in engines:
        if "error" in r:
            rows.append(f"{name:14} {r['error']}")
            continue
        rows.append(f"{name:14} {r['load_s']:8.2f} {r['ttft_s']:8.2f} {r['prefill_tok_s']:10.1f} {r['decode_tok_s']:10.1f} "
                    f"{r['peak_rss_mb']:8.0f}")
    for name, r in engines[1:]:
        if "ratio" in r:
            q = r["ratio"]
            rows.append(f"camelid vs {name}: prefill {q['prefill']:.2f}x, decode {q['decode']:.2f}x, load {q['load']:.2f}x faster, "
                        f"first token {q['ttft']:.2f}x sooner, {q['rss']:.2f}x less memory")
    if "decode_at_2000_tok_s" in result:
        d1, d2 = result["decode_at_100_tok_s"], result["decode_at_2000_tok_s"]
        deep_rss = f"; peak RSS {result['peak_rss_deep_mb']:.0f} MB with its 4096-slot caches" if "peak_rss_deep_mb" in result else ""
        rows.append(f"camelid decode at position 100: {d1:.1f} tok/s, at 2000: {d2:.1f} tok/s ({d1 / d2:.2f}x the time per token)"
                    + deep_rss)
    m = result["machine"]
    rows.append(f"{m['cpu']}, {m['cores']} cores, {result['threads']} threads, torch {m['torch']}; medians of {result['repeats']}; "
                f"camelid {result['quant']} path" + (", compiled decode step" if result.get("compiled") else ", eager decode"))
    return "\n".join(rows)


def _main(argv: list[str]) -> None:  # worker entry points (python -m camelid.bench ...)
    if argv[0] == "worker":
        engine, path, threads, pp, tg, repeats, quant = argv[1:8]
        out = WORKERS[engine](path, int(threads), int(pp), int(tg), int(repeats), None if quant == "None" else quant)
        print(json.dumps(out))
    elif argv[0] == "first-token":
        FIRST_TOKEN[argv[1]](argv[2], int(argv[3]))


if __name__ == "__main__":
    _main(sys.argv[1:])
