"""Pretraining throughput: camelid's training loop vs a plain transformers LlamaForCausalLM loop, same run.

    python bench/bench_pretrain.py [--preset tiny] [--seq-len 256] [--batch-size 4] [--steps 8] [--data DIR]

Both train the same architecture (the preset with the data's vocabulary), from the same initial weights, on the
same batches (camelid's TokenBatches over prepared data), with AdamW (betas 0.9/0.95, weight decay 0.1), gradient
clipping at 1.0, in float32 and under bf16 autocast. The peer is the loop a transformers user writes:
`loss = model(input_ids=x, labels=x).loss; loss.backward(); clip; opt.step()` (labels shifted inside the model).
Tokens/s is the median over the steps after the first two (warm-up).

MFU = tokens/s * FLOPs per token / peak, FLOPs per token = 6 * N_matmul + 12 * n_layers * dim * seq_len
(camelid/train/flops.py: N_matmul counts every linear and the output layer, not the embedding lookup), and the
peak is measured here: the best 2048 x 2048 matmul in the same precision (float32 or bf16) with the same threads.

Without --data it makes its corpus: the docstrings of Python's standard library (this interpreter's own), a
4096-token tokenizer and prepared shards in a temporary folder.
"""

from __future__ import annotations

import argparse
import ast
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def stdlib_corpus(out: Path) -> Path:
    """Docstrings of the standard library's top-level modules, one .txt file per module."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [d for n in ast.walk(tree) if isinstance(n, kinds) and (d := ast.get_docstring(n)) and len(d) > 40]
        if docs:
            (out / f"{f.stem}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return out


def make_data(tmp: Path) -> Path:
    from camelid.train.shards import prepare
    from camelid.train.tokenizer_train import train_tokenizer

    corpus = stdlib_corpus(tmp / "corpus")
    train_tokenizer([corpus], 4096, tmp / "tok", progress=False)
    prepare([corpus], tmp / "tok", tmp / "data", progress=False)
    return tmp / "data"


def camelid_run(cfg, data, seq_len, batch_size, steps, precision, state, out, compile_blocks=False) -> list[float]:
    from camelid.model import Transformer
    from camelid.train import loop
    from camelid.train.shards import TokenBatches

    model = Transformer(cfg)
    model.load_state_dict(state)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.train().requires_grad_(True)
    if compile_blocks:
        for block in model.layers:
            block.compile()
    batches = TokenBatches(data, seq_len=seq_len, batch_size=batch_size, seed=0)
    tc = loop.TrainConfig(steps=steps, lr=1e-3, warmup_steps=1, weight_decay=0.1, betas=(0.9, 0.95), precision=precision)
    loop.train(model, batches, tc, out, progress=False)
    rates = [r["tokens_per_s"] for r in loop_metrics(out)]
    return rates


def loop_metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def hf_run(cfg, data, seq_len, batch_size, steps, precision, state) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from camelid.formats.hf_write import hf_name
    from camelid.train.shards import TokenBatches

    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                       rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                       attn_implementation="sdpa")
    model = LlamaForCausalLM(hcfg)
    hf_state = {hf_name(k): v for k, v in state.items() if not (cfg.tie_embeddings and k == "output.weight")}
    model.load_state_dict(hf_state, strict=False)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    it = iter(TokenBatches(data, seq_len=seq_len, batch_size=batch_size, seed=0))
    rates = []
    for _ in range(steps):
        b = next(it)
        t0 = time.perf_counter()
        x = torch.cat([b.tokens, b.targets[:, -1:]], dim=1)  # the window; the model shifts labels itself
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(b.tokens.numel() / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", default=None, help="prepared data (camelid prepare); default: stdlib docstrings")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also camelid with torch.compile'd blocks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from camelid.model import Transformer
    from camelid.train.flops import flops_per_token, measure_peak
    from camelid.train.pretrain import init_weights, model_config
    from camelid.train.shards import read_meta

    tmp = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    data = Path(args.data) if args.data else make_data(tmp)
    cfg = model_config(args.preset, None, read_meta(data)["vocab_size"])
    ref = Transformer(cfg)
    init_weights(ref, 0)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    fpt = flops_per_token(cfg, args.seq_len)
    from camelid.train.loop import cpu_has_native_bf16

    # bf16 only where the CPU computes it natively: elsewhere torch falls back to a scalar path (0.1 GFLOP/s
    # measured on a CPU whose oneDNN reports no bf16 support), and neither loop would use it
    precisions = ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",)
    peaks = {p: measure_peak(torch.bfloat16 if p == "bf16" else torch.float32, seconds=2.0) for p in precisions}

    rows = []
    runs = [("camelid", p, False) for p in precisions] + [("transformers", p, False) for p in precisions]
    if args.compile:
        runs.insert(len(precisions), ("camelid + compile", precisions[-1], True))
    for who, precision, comp in runs:
        if who.startswith("camelid"):
            rates = camelid_run(cfg, data, args.seq_len, args.batch_size, args.steps, precision, state,
                                tmp / f"run-{who.replace(' ', '')}-{precision}", comp)
        else:
            rates = hf_run(cfg, data, args.seq_len, args.batch_size, args.steps, precision, state)
        med = statistics.median(rates[2:] if len(rates) > 3 else rates)
        rows.append((who, precision, med, med * fpt / peaks[precision]))
        print(f"  {who} {precision}: {med:.0f} tok/s", file=sys.stderr, flush=True)

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), platform.processor())
    print(f"\npretraining throughput, preset {args.preset} ({cfg.param_count() / 1e6:.2f} M parameters, vocab "
          f"{cfg.vocab_size}), batch {args.batch_size} x seq {args.seq_len}, {args.threads} threads, {name}; "
          f"torch {torch.__version__}; median of steps 3..{args.steps}")
    peak_text = ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items())
    if "bf16" not in peaks:
        peak_text += " (bf16 skipped: this CPU's oneDNN reports no native bf16)"
    print(f"FLOPs/token = 6 * N_matmul + 12 * L * d * T = {fpt / 1e6:.2f} M; measured peak: {peak_text}")
    print(f"{'loop':20} {'precision':9} {'tok/s':>9} {'MFU':>7} {'vs transformers':>16}")
    peer = {p: t for who, p, t, _ in rows if who == "transformers"}
    for who, precision, tps, mfu in rows:
        ratio = f"{tps / peer[precision]:.2f}x" if who != "transformers" else ""
        print(f"{who:20} {precision:9} {tps:9.0f} {mfu:7.1%} {ratio:>16}")


if __name__ == "__main__":
    main()
