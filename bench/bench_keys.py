"""What the keys stage (authenticate + scopes + limits, camelid/serve/gate.py) costs a request: median latency of
POST /tokenize and of a one-token /v1/completions through the whole ASGI app, in process, with no auth (the peer:
the same server, same run), --api-key, and --keys (a key without limits, and one with models, rpm, tpm,
concurrency, max_tokens and daily_tokens all set, so every check runs and the body is read twice).

    python bench/bench_keys.py [--model PATH] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path


def lscpu_model() -> str:
    from camelid.cpu import cpu_model

    return cpu_model()


async def median_ms(app, path: str, body: dict, secret: str | None, n: int) -> float:
    import httpx

    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://bench") as client:
        for _ in range(10):  # warm up
            (await client.post(path, json=body, headers=headers)).raise_for_status()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            r = await client.post(path, json=body, headers=headers)
            times.append(time.perf_counter() - t)
            r.raise_for_status()
    return 1000 * statistics.median(times)


def main() -> None:
    from camelid.serve import build_state
    from camelid.serve.app import create_app
    from camelid.serve.keys import KeyStore, add_key
    from camelid.store import resolve

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="store name or path (default: the default model)")
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    state = build_state(str(resolve(args.model)), max_concurrency=2, max_seq_len=256, cache_mb=0)
    state.engine.start()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        _, plain = add_key(keys, "plain")
        big = 10**9
        _, limited = add_key(keys, "limited", models=state.model_id, rpm=big, tpm=big, concurrency=64, max_tokens=8,
                             daily_tokens=big)
        store = KeyStore(keys)
        variants = [("no auth (peer)", None, None, None), ("--api-key", "k" * 32, None, "k" * 32),
                    ("--keys, no limits", None, store, plain), ("--keys, every limit", None, store, limited)]
        rows = []
        for name, api_key, ks, secret in variants:
            state.api_key, state.keys = api_key, ks
            app = create_app(state)
            tok = asyncio.run(median_ms(app, "/tokenize", {"content": "Hello there, how are you?"}, secret, args.requests))
            gen = asyncio.run(median_ms(app, "/v1/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0},
                                        secret, max(30, args.requests // 5)))
            rows.append((name, tok, gen))
    state.engine.stop()
    base_tok, base_gen = rows[0][1], rows[0][2]
    print(f"CPU: {lscpu_model()} (a shared 2-core machine, loaded by other work while this ran)")
    print(f"model: {state.model_id}; medians over {args.requests} /tokenize and {max(30, args.requests // 5)} completions")
    print(f"{'auth':24} {'/tokenize ms':>13} {'ratio':>6} {'completion(1) ms':>17} {'ratio':>6}")
    for name, tok, gen in rows:
        print(f"{name:24} {tok:13.3f} {tok / base_tok:6.2f} {gen:17.3f} {gen / base_gen:6.2f}")


if __name__ == "__main__":
    main()
