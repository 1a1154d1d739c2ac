"""What the audit log costs a request: camelid.audit.AuditLog.record (chain hash, keyed hashes, one os.write, a signed
checkpoint every N records) against the peer of a plain append-only JSON-lines access log (json.dumps + one os.write
of the same fields, no chain, no signature), in one run; and verify's speed over the log written.

    python bench/bench_audit.py [--records 5000] [--repeats 5] [--every 100]

Each figure is the median over --repeats runs of --records records each, in microseconds per record. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from camelid.audit import AuditLog, verify

FIELDS = {"time": "2026-12-02T04:20:00.123Z", "id": "req-0123456789abcdef01234567", "key": "alice", "method": "POST",
          "endpoint": "/v1/chat/completions", "model": "smollm2-135m-instruct", "status": 200, "latency_ms": 812.4,
          "stream": True, "tokens": {"prompt_tokens": 412, "completion_tokens": 96, "total_tokens": 508},
          "finish_reason": ["stop"], "verdicts": []}
PROMPT, ANSWER = "Tell me about llamas. " * 60, "Llamas are camelids. " * 20


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run_audit(folder: Path, n: int, every: int, fsync: str) -> float:
    log = AuditLog(folder / f"audit-{fsync}.log", checkpoint_every=every, fsync=fsync)
    start = time.perf_counter()
    for _ in range(n):
        log.record({**FIELDS, "prompt_hmac": log.key.keyed_hash(PROMPT), "answer_hmac": log.key.keyed_hash(ANSWER)})
    took = time.perf_counter() - start
    log.close()
    return took / n * 1e6


def run_plain(folder: Path, n: int) -> float:
    fd = os.open(folder / "plain.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    start = time.perf_counter()
    for _ in range(n):
        os.write(fd, json.dumps(FIELDS, separators=(",", ":")).encode() + b"\n")
    took = time.perf_counter() - start
    os.close(fd)
    return took / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--every", type=int, default=100, help="records between checkpoints (serve's default 100)")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {"plain JSON lines (peer)": [], "audit, fsync at checkpoints": [],
                                    "audit, fsync every record": [], "verify (per line)": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d)
            rows["plain JSON lines (peer)"].append(run_plain(folder, args.records))
            rows["audit, fsync at checkpoints"].append(run_audit(folder, args.records, args.every, "checkpoint"))
            rows["audit, fsync every record"].append(run_audit(folder, max(1, args.records // 10), args.every, "always"))
            start = time.perf_counter()
            rep = verify(folder / "audit-checkpoint.log")
            rows["verify (per line)"].append((time.perf_counter() - start) / rep.lines * 1e6)
            assert rep.status == "ok"
    peer = statistics.median(rows["plain JSON lines (peer)"])
    print(f"CPU: {cpu()}; {os.cpu_count()} cores; {args.records} records x {args.repeats} runs (medians); "
          f"checkpoint every {args.every}")
    print(f"{'what':32} {'us/record':>10} {'x peer':>8}")
    for name, values in rows.items():
        m = statistics.median(values)
        print(f"{name:32} {m:>10.1f} {m / peer:>8.1f}")


if __name__ == "__main__":
    main()
