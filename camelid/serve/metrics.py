"""A few Prometheus metrics (counters, gauges, histograms) rendered in the text exposition format."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + inner + "}"


def _num(value: float) -> str:
    """A sample value: whole numbers exactly (a byte count in %g would lose digits)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}
        self.lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self.lock:
            items = list(self.values.items()) or [((), 0.0)]
        return lines + [f"{self.name}{_labels(k)} {v:g}" for k, v in items]


class Gauge:
    """A value read when scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.read())}"]


class ReadCounter(Gauge):
    """A counter kept elsewhere (read when scraped)."""

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter", f"{self.name} {_num(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self.lock:
            counts, total = list(self.counts), self.sum
        running = 0
        for bound, count in zip(self.buckets, counts, strict=False):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        running += counts[-1]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {running}', f"{self.name}_sum {total:g}", f"{self.name}_count {running}"]
        return lines


class Metrics:
    """The server's metrics. Gauges read the engine when scraped."""

    def __init__(self, engine) -> None:
        self.requests = Counter("camelid_requests_total", "HTTP requests by endpoint and status code")
        self.prompt_tokens = Counter("camelid_prompt_tokens_total", "prompt tokens of finished requests")
        self.completion_tokens = Counter("camelid_completion_tokens_total", "generated tokens of finished requests")
        self.latency = Histogram("camelid_request_latency_seconds", "time from request to last token (generation endpoints)")
        self.ttft = Histogram("camelid_time_to_first_token_seconds", "time from request to first token")
        # keys (camelid/serve/gate.py): per key name
        self.key_requests = Counter("camelid_key_requests_total", "requests admitted, by key")
        self.key_tokens = Counter("camelid_key_tokens_total", "tokens charged (usage.total_tokens), by key")
        self.key_refusals = Counter("camelid_key_refusals_total", "requests refused by key and reason (rpm, tpm, "
                                    "concurrency, daily_tokens: 429; endpoint, model: 403; max_tokens: 400)")
        self.key_auth_failures = Counter("camelid_key_auth_failures_total",
                                         "401s by reason (missing, unknown, revoked, expired)")
        # the content policy (camelid/serve/policy.py)
        self.policy_blocks = Counter("camelid_policy_blocks_total", "requests or answers blocked, by key, stage and "
                                     "category (a guard category code, or the rule's name)")
        self.policy_verdicts = Counter("camelid_policy_verdicts_total", "policy hits by stage, source and action")
        self.guard_latency = Histogram("camelid_guard_latency_seconds", "time of one guard model check")
        self.guard_failures = Counter("camelid_guard_failures_total", "guard checks that failed (the request failed closed)")
        self.gauges = [
            Gauge("camelid_queue_depth", "sequences waiting for a slot", lambda: engine.queued),
            Gauge("camelid_running_sequences", "sequences holding a slot", lambda: engine.active),
            Gauge("camelid_slots", "slots (the most sequences decoding at once)", lambda: engine.slots),
            Gauge("camelid_engine_steps", "scheduler steps run", lambda: engine.steps),
            ReadCounter("camelid_speculative_drafted_tokens_total", "tokens proposed by the drafter (prompt lookup or a draft model)",
                        lambda: engine.drafted_tokens),
            ReadCounter("camelid_speculative_accepted_tokens_total", "proposed tokens the model confirmed",
                        lambda: engine.accepted_tokens),
        ]
        store = engine.prompt_cache.store
        self.gauges += [
            ReadCounter("camelid_prompt_cache_hits_total", "requests that reused cached prompt chunks", lambda: store.hits),
            ReadCounter("camelid_prompt_cache_misses_total", "requests that found no cached prompt chunk", lambda: store.misses),
            ReadCounter("camelid_prompt_cache_hit_tokens_total", "prompt tokens restored from the cache", lambda: store.hit_tokens),
            ReadCounter("camelid_prompt_cache_evictions_total", "cached chunks evicted (least recently used first)",
                  lambda: store.evictions),
            Gauge("camelid_prompt_cache_bytes", "bytes of KV held by the prompt cache", lambda: store.bytes),
            Gauge("camelid_prompt_cache_blocks", "chunks held by the prompt cache", lambda: len(store)),
            Gauge("camelid_prompt_cache_capacity_bytes", "the prompt cache's budget (--cache-mb)", lambda: store.capacity),
        ]

    def render(self) -> str:
        lines: list[str] = []
        keys = (self.key_requests, self.key_tokens, self.key_refusals, self.key_auth_failures)
        policy = (self.policy_blocks, self.policy_verdicts, self.guard_latency, self.guard_failures)
        for m in (self.requests, self.prompt_tokens, self.completion_tokens, self.latency, self.ttft, *keys, *policy,
                  *self.gauges):
            lines += m.render()
        return "\n".join(lines) + "\n"
