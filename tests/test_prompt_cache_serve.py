"""The prompt cache through `camelid serve`: cached_tokens in usage, the same text, salts, /metrics, the budget."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from conftest import running_server


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_server_reuses_a_shared_prefix_exactly_within_its_budget(default_model_path):
    system = "You answer questions about the history of bread, briefly and politely. " * 6
    with running_server(default_model_path, "--cache-mb", "8", "--max-seq-len", "512", "--max-concurrency", "2") as (base, _):
        def ask(question: str, **extra) -> dict:
            body = {"prompt": system + question, "max_tokens": 6, "temperature": 0, **extra}
            r = httpx.post(base + "/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()

        first = ask("Where was bread first baked?")
        again = ask("Where was bread first baked?")
        other = ask("Who invented the toaster?")
        salted = ask("Where was bread first baked?", cache_salt="tenant-b")
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 48
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] >= 48
        assert salted["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # another salt's blocks are not its own
        assert again["choices"][0]["text"] == first["choices"][0]["text"] == salted["choices"][0]["text"]
        bad = httpx.post(base + "/v1/completions", json={"prompt": "x", "cache_salt": 3}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
        for i in range(6):  # more distinct prompts than 8 MiB holds beside a running one (46 KB a token here)
            ask(f"Question number {i}: " + "why? " * 10)
        # a request's own KV counts against the budget while it runs (a ~110-token row holds ~5 MB of the 8 MiB), so
        # what stays cached is what fits beside it; an idle server may also fill the last reply's chunks back in
        deadline = time.time() + 120
        while True:
            text = httpx.get(base + "/metrics", timeout=30).text
            if metric(text, "camelid_prompt_cache_bytes") > 0 or time.time() > deadline:
                break
            time.sleep(0.2)  # polling for the idle engine's fill
        assert metric(text, "camelid_prompt_cache_hits_total") >= 2
        assert metric(text, "camelid_prompt_cache_misses_total") >= 2
        assert 0 < metric(text, "camelid_prompt_cache_bytes") <= metric(text, "camelid_prompt_cache_capacity_bytes")
        assert metric(text, "camelid_prompt_cache_capacity_bytes") == 8 << 20
