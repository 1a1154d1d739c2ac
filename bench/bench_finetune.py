"""Fine-tuning throughput and memory: camelid LoRA, QLoRA and full fine-tuning against transformers + peft (LoRA) and
transformers alone (full), on the same model file, the same token ids and the same sequence length, in one run.

    python bench/bench_finetune.py [MODEL] [--seq-len 256] [--steps 8] [--warmup 2] [--threads N] [--repeats 3]
                                   [--data text|chat] [--json]

Every configuration runs in a process of its own (so peak RSS is its own) and trains `warmup + steps` optimizer
steps of batch 1 x seq-len tokens with AdamW; tokens/s is the median over the measured steps (the warm-up steps are
not counted), and each figure is the median over --repeats processes. All use LoRA r=8, alpha=16, dropout 0 on all
seven block linears (q,k,v,o,gate,up,down). camelid runs the real `camelid.finetune` path (precision auto: bf16
autocast where the CPU computes bfloat16 natively); transformers runs float32 (what a user gets by default on CPU)
and, for LoRA, also bf16 autocast. Where the CPU has native bfloat16, camelid also runs with precision fp32
(camelid-lora-fp32, camelid-full-fp32), and each camelid row is compared with the peer of the same arithmetic
(the table's precision and peer columns): peft-lora-bf16 for camelid's bf16 LoRA, peft-lora for float32.
camelid-lora-compiled is camelid-lora with --compile (torch.compile per block); "warm-up s" is the time of the
unmeasured first steps, which holds its compilation (less on later runs, from Inductor's on-disk cache).

--data text (default): rows of plain text, every token trained. --data chat: each row one multi-turn conversation
(the question/answer pairs of examples/facts, as many as fit in seq-len), rendered by camelid's chat-template code,
only the assistant's tokens trained (the default of `camelid finetune`); transformers gets the same token ids with
the prompt's labels set to -100, so both compute the same loss on the same rows.
camelid shuffles the rows (finetune's default) and transformers takes them in order, so their "loss first -> last"
are of different rows (on one row both give the same loss: 2.6388 on the first chat row, float32).
Not a test: it prints a table (and --json) and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("camelid-lora", "camelid-lora-compiled", "camelid-lora-fp32", "camelid-qlora", "camelid-full",
           "camelid-full-fp32", "peft-lora", "peft-lora-bf16", "transformers-full")
NEED_NATIVE_BF16 = ("camelid-lora-fp32", "camelid-full-fp32", "peft-lora-bf16")  # elsewhere fp32 is camelid's default
TEXT = ("Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures "
        "since the pre-Columbian era. They are social animals and live with others as a herd. Their wool is soft "
        "and contains only a small amount of lanolin. Llamas can learn simple tasks after a few repetitions. When "
        "using a pack, they can carry about 25 to 30 percent of their body weight for 8 to 13 km. ")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ids(path: str, seq_len: int, rows: int) -> list[list[int]]:
    from camelid.formats import read

    tok = read(path).tokenizer
    ids = tok.encode(TEXT * (1 + seq_len * rows // 60), special=False, bos=False)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(rows)]


def _chat_file(path: str, seq_len: int, rows: int, out: Path) -> Path:
    """`rows` conversations, each as many examples/facts question/answer turns as fit in seq_len tokens."""
    from camelid.formats import read
    from camelid.train.data import load_samples

    pairs = [json.loads(line)["messages"] for line in (REPO / "examples" / "facts" / "train.jsonl").read_text().splitlines()]
    tokenizer, records, i = read(path).tokenizer, [], 0
    for _ in range(rows):
        messages: list[dict] = []
        while True:
            candidate = messages + pairs[i % len(pairs)]
            out.write_text(json.dumps({"messages": candidate}) + "\n")
            if len(load_samples(out, tokenizer, seq_len=10**6)[0][0].ids) > seq_len:
                break
            messages, i = candidate, i + 1
        records.append(json.dumps({"messages": messages}))
    out.write_text("\n".join(records) + "\n")
    return out


def _rows(path: str, data: str, seq_len: int, rows: int, tmp: Path) -> tuple[Path, list[tuple[list[int], list[int]]]]:
    """The data file camelid trains on, and the same rows as (token ids, labels with -100 where untrained)."""
    from camelid.formats import read

    if data == "chat":
        from camelid.train.data import load_samples

        file = _chat_file(path, seq_len, rows, tmp / "data.jsonl")
        samples = load_samples(file, read(path).tokenizer, seq_len=seq_len)[0]
        return file, [(s.ids, [t if keep else -100 for t, keep in zip(s.ids, s.trained, strict=True)]) for s in samples]
    tokenizer, file = read(path).tokenizer, tmp / "data.jsonl"
    ids = _ids(path, seq_len, rows)
    # one record per row, decoded from the same ids (round trip checked): packing then gives one row per step
    with file.open("w") as f:
        for row in ids:
            f.write(json.dumps({"text": tokenizer.decode(row[: seq_len - 2])}) + "\n")
    return file, [(row, row) for row in ids]


def _worker_camelid(path: str, method: str, seq_len: int, steps: int, warmup: int, data_kind: str = "text") -> dict:
    import torch

    import camelid
    from camelid.train.loop import resolve_precision

    method, *options = method.split("-")  # lora | lora-fp32 | lora-compiled ...
    precision = resolve_precision("fp32" if "fp32" in options else "auto", torch.device("cpu"))

    with tempfile.TemporaryDirectory() as tmp:
        data, _ = _rows(path, data_kind, seq_len, steps + warmup, Path(tmp))
        out = Path(tmp) / "out"
        camelid.finetune(path, data, out, method=method, steps=steps + warmup, seq_len=seq_len, batch_size=1,
                         rank=8, alpha=16, dropout=0.0, lr=1e-4, warmup_steps=1, eval_every=10**6, progress=False,
                         pack=data_kind == "text", precision=precision, compile="compiled" in options)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = rows[warmup:]
    tps = statistics.median(r["tokens_per_s"] for r in measured)
    return {"tokens_per_s": tps, "peak_rss_mb": _rss_mb(), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "bf16": precision == "bf16", "warmup_s": rows[warmup - 1]["elapsed_s"] if warmup else 0.0}


def _worker_transformers(path: str, method: str, seq_len: int, steps: int, warmup: int, bf16: bool = False,
                         data_kind: str = "text") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        rows = _rows(path, data_kind, seq_len, steps + warmup, Path(tmp))[1]
    times, losses, spent = [], [], []
    for row, labels in rows:
        x = torch.tensor([row])
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=torch.tensor([labels])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        spent.append(time.perf_counter() - t)
        times.append((len(row) - 1) / spent[-1])
        losses.append(float(loss))
    tps = statistics.median(times[warmup:])
    return {"tokens_per_s": tps, "peak_rss_mb": _rss_mb(), "loss_first": losses[0], "loss_last": losses[-1], "bf16": bf16,
            "warmup_s": sum(spent[:warmup])}


def worker(config: str, path: str, seq_len: int, steps: int, warmup: int, data_kind: str = "text") -> dict:
    engine, method = config.split("-", 1)
    if engine == "camelid":
        return _worker_camelid(path, method, seq_len, steps, warmup, data_kind)
    return _worker_transformers(path, "lora" if method.startswith("lora") else "full", seq_len, steps, warmup,
                                bf16=method.endswith("bf16"), data_kind=data_kind)


def _cpu() -> str:
    from camelid.cpu import cpu_model

    return cpu_model()


def _cpu_flags() -> str:
    try:
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return "-"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=None, help="comma-separated (default: all; peft-lora-bf16 only where the CPU "
                    "has native bfloat16: elsewhere it is emulated, several times slower, and measures nothing useful)")
    ap.add_argument("--data", choices=("text", "chat"), default="text",
                    help="text: every token trained; chat: conversations, the assistant's tokens trained (see above)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_intermixed_args()
    threads = args.threads or min(os.cpu_count() or 1, 8)
    if args.worker:
        import torch

        torch.set_num_threads(threads)
        print(json.dumps(worker(args.worker, args.path, args.seq_len, args.steps, args.warmup, args.data)))
        return
    from camelid.store import resolve

    path = str(resolve(args.model))
    if args.configs is None:
        from camelid.cpu import cpu_has_native_bf16

        args.configs = ",".join(c for c in CONFIGS if c not in NEED_NATIVE_BF16 or cpu_has_native_bf16())
    results: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for config in args.configs.split(","):  # interleaved, so drift in the machine's speed hits every config alike
            print(f"[{rep + 1}/{args.repeats}] {config} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--worker", config, "--path", path, "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads), "--data", args.data]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if r.returncode != 0:
                print(f"{config} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
                      file=sys.stderr)
                continue
            results.setdefault(config, []).append(json.loads(r.stdout.strip().splitlines()[-1]))
    med = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for c, rs in results.items()}
    summary = {"cpu": _cpu(), "cpu_features": _cpu_flags(), "threads": threads, "seq_len": args.seq_len, "data": args.data,
               "steps": args.steps, "repeats": args.repeats, "model": path, "results": med}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    def peer(config: str) -> str:
        """The peer with the same arithmetic: peft under bf16 autocast where camelid's precision auto chose bf16."""
        if config.startswith("camelid-full"):
            return "transformers-full"  # float32: transformers' full fine-tuning has no bf16 variant here
        if not config.startswith("camelid-"):
            return ""
        return "peft-lora-bf16" if med[config]["bf16"] and "peft-lora-bf16" in med else "peft-lora"

    print(f"CPU: {summary['cpu']} ({summary['cpu_features']}), {threads} threads; {args.data} data, seq {args.seq_len}, batch 1, "
          f"{args.steps} measured steps after {args.warmup}; medians of {args.repeats} processes\n")
    print("| configuration | precision | tokens/s | peak RSS MB | peer | tokens/s vs peer | RSS vs peer | warm-up s "
          "| loss first -> last |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in CONFIGS:
        if c not in med:
            continue
        m, p = med[c], med.get(peer(c))
        ratio = f"{m['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"
        rss = f"{m['peak_rss_mb'] / p['peak_rss_mb']:.2f}x" if p else "-"
        print(f"| {c} | {'bf16' if m['bf16'] else 'fp32'} | {m['tokens_per_s']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{peer(c) if p else '-'} | {ratio} | {rss} | {m.get('warmup_s', 0):.1f} | "
              f"{m['loss_first']:.3f} -> {m['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
