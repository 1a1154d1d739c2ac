"""Aggregate decode throughput of `camelid serve` at 1, 4, 8 and 16 concurrent streams, next to llama.cpp's
server on the same GGUF, both measured in this run on this machine: llama.cpp's own llama-server with as many parallel
slots as the most streams (`-np`) when scripts/llama-cpp-tools.sh has built it, else llama-cpp-python's server.

    python bench/bench_serve.py [--model PATH] [--max-tokens 64] [--repeats 3] [--concurrency 1 4 8 16]

Each server runs alone (one after the other), on loopback. Beside them, the same single-stream requests through the
Python API in a process of its own (`in-process`: no server, the same prompts, sampling and token counts), which
a single stream through `camelid serve` is held to (issue 12: at least 0.9x). A level of concurrency C runs C client threads,
each sending `requests` completions one after another; throughput = completion tokens (from `usage`) / wall
time, median over repeats. The peer is skipped, with a note, when llama_cpp is not installed
(pip install 'camelid[bench]').
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "The history of the city begins", "Here is a recipe for bread:", "Dear diary, today",
           "The rules of chess are", "In the year 2050,", "A short poem about the sea:", "The best way to learn is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], base: str, env: dict | None = None) -> subprocess.Popen:
    # the log goes to a file: a pipe nobody reads fills up and blocks a chatty server (llama.cpp's is)
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server failed: {' '.join(cmd)}\n{log.read()[-2000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def serving(cmd_for, env: dict):
    """A server started from cmd_for(port) on a free loopback port, up until the block ends: yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(cmd_for(port), base, env)
    try:
        yield base
    finally:
        stop(proc)


def camelid_server(gguf: str, *flags: str):
    return lambda port: [sys.executable, "-m", "camelid.serve", gguf, "--port", str(port), "--model-id", "m",
                         "--log-level", "warning", *flags]


def llama_cpp_server(gguf: str, threads: int, n_ctx: int, slots: int = 1):
    """The llama.cpp peer's server command: llama.cpp's own llama-server (with `slots` parallel sequences) when
    scripts/llama-cpp-tools.sh has built it, else llama-cpp-python's server (one sequence at a time); None, with a
    note, when neither is installed."""
    binary = llama_server_binary()
    if binary:
        return lambda port: [binary, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-c", str(n_ctx * slots),
                             "-np", str(slots), "-t", str(threads), "--alias", "m", "--log-disable"]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp peer skipped: neither llama-server (scripts/llama-cpp-tools.sh) nor llama_cpp is installed")
        return None
    return lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--host",
                         "127.0.0.1", "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--model_alias", "m"]


def llama_server_binary() -> str | None:
    import shutil

    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "camelid"
    found = sorted(home.glob("llama.cpp-*-bin/llama-server"))
    return str(found[-1]) if found else shutil.which("llama-server")


def level(base: str, model: str, concurrency: int, requests: int, max_tokens: int) -> tuple[float, int]:
    """(tokens per second, tokens) for `concurrency` clients each sending `requests` completions."""
    counts: list[int] = []
    errors: list[str] = []

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {"model": model, "prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0.8, "seed": c * 100 + r}
                resp = http.post(base + "/v1/completions", json=body)
                if resp.status_code != 200:
                    errors.append(resp.text[:200])
                    continue
                counts.append(resp.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"errors at concurrency {concurrency}: {errors[:3]}")
    return sum(counts) / elapsed, sum(counts)


IN_PROCESS = """
import statistics, sys, time
import camelid
from camelid.compiled import package_for, step_for
from camelid.sampling import SamplingParams
gguf, max_tokens, requests, repeats = sys.argv[1], *map(int, sys.argv[2:5])
prompts = sys.argv[5:]
llm = camelid.load(gguf, cache_mb=0)  # no prompt cache: the servers' requests share no prefix either
if package_for(llm.model, llm.checkpoint.path, "auto").is_file():  # built: wait until it is bound
    deadline = time.time() + 60
    while step_for(llm.model) is None and time.time() < deadline:
        time.sleep(0.05)
llm.complete(prompts[0], max_tokens=8)
runs = []
for _ in range(repeats):
    tokens, t0 = 0, time.perf_counter()
    for r in range(requests):
        sampling = SamplingParams(temperature=0.8, seed=r)
        tokens += len(llm.complete(prompts[r % len(prompts)], max_tokens=max_tokens, sampling=sampling).token_ids)
    runs.append(tokens / (time.perf_counter() - t0))
print(statistics.median(runs), *runs)
"""


def in_process(gguf: str, env: dict, args) -> float:
    """Single-stream tok/s through the Python API (the same requests as one server stream), in a process of its own."""
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, gguf, str(args.max_tokens), str(args.requests),
                          str(args.repeats), *PROMPTS], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"in-process run failed:\n{out.stderr[-2000:]}")
    median, *runs = map(float, out.stdout.split())
    print(f"  {'in-process':10s}   1 stream:  {median:7.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in runs)})", flush=True)
    return median


def measure(name: str, base: str, model: str, args) -> dict[int, float]:
    level(base, model, 2, 1, 8)  # warm up
    out = {}
    for c in args.concurrency:
        runs = [level(base, model, c, args.requests, args.max_tokens)[0] for _ in range(args.repeats)]
        out[c] = statistics.median(runs)
        print(f"  {name:10s} {c:3d} streams: {out[c]:7.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in runs)})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: the store's default model)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="completions per client thread")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both servers")
    ap.add_argument("--prompt-cache", action="store_true",
                    help="the prompt-cache scenarios instead (bench/bench_prompt_cache.py)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from camelid.store import resolve

    gguf = str(resolve(args.model))
    if args.prompt_cache:
        return prompt_cache_main(gguf, args)
    slots = max(args.concurrency)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    print(f"model {gguf}; {args.max_tokens} new tokens per request, {args.requests} requests per stream, "
          f"median of {args.repeats}; {args.threads} threads; {os.cpu_count()} cores")
    results: dict[str, dict[int, float]] = {}

    with serving(camelid_server(gguf, "--max-concurrency", str(slots), "--max-seq-len", "512"), env) as base:
        results["camelid"] = measure("camelid", base, "m", args)
    alone = in_process(gguf, env, args)
    peer = llama_cpp_server(gguf, args.threads, 512, slots)
    if peer is not None:
        with serving(peer, env) as base:
            results["llama.cpp"] = measure("llama.cpp", base, "m", args)

    print("\n| streams | camelid tok/s | x single | llama.cpp server tok/s | camelid / llama.cpp |")
    print("|---|---|---|---|---|")
    cam = results["camelid"]
    peer = results.get("llama.cpp", {})
    for c in args.concurrency:
        p = peer.get(c)
        print(f"| {c} | {cam[c]:.1f} | {cam[c] / cam[args.concurrency[0]]:.2f} | {f'{p:.1f}' if p else '-'} | "
              f"{f'{cam[c] / p:.2f}' if p else '-'} |")
    if 1 in cam:
        print(f"\none stream through camelid serve / in-process (the Python API): {cam[1] / alone:.2f}x")


def prompt_cache_main(gguf: str, args) -> None:
    """camelid with the prompt cache on and off, and llama.cpp's server, through the same scenarios."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_prompt_cache as pc

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    results: dict = {"prefix": {}, "turns": {}, "throughput": {}}
    # reuse goes to the token where camelid's attention kernel is built (camelid/prompt_cache.py); the last two
    # servers go without it (CAMELID_KERNELS=0: torch's attention, whole chunks), for the same-run comparison
    servers = [("camelid cache on", ["--cache-mb", "1024"], {}), ("camelid cache off", ["--cache-mb", "0"], {}),
               ("camelid cache on, whole chunks", ["--cache-mb", "1024"], {"CAMELID_KERNELS": "0"}),
               ("camelid cache off, torch's attention", ["--cache-mb", "0"], {"CAMELID_KERNELS": "0"})]
    for name, flags, extra in servers:
        with serving(camelid_server(gguf, "--max-concurrency", "8", "--max-seq-len", "2048", *flags),
                     {**env, **extra}) as base:
            pc.throughput(base, "m", 2, 4)  # warm up
            results["prefix"][name] = pc.shared_prefix(base, "m")
            results["turns"][name] = pc.chat_turns(base, "m")
            results["throughput"][name] = [pc.throughput(base, "m") for _ in range(args.repeats)]
            print(name, results["prefix"][name], results["turns"][name], results["throughput"][name], flush=True)
    peer = llama_cpp_server(gguf, args.threads, 4096)
    if peer is not None:
        with serving(peer, env) as base:
            results["prefix"]["llama.cpp server"] = pc.shared_prefix(base, "m")
            print("llama.cpp", results["prefix"]["llama.cpp server"], flush=True)
    pc.report(results)


if __name__ == "__main__":
    main()
