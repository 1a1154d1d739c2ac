"""camelid's `perplexity --chunks` next to llama.cpp's llama-perplexity figure on the same GGUF and text.

llama.cpp is driven through llama-cpp-python (the project's llama.cpp peer) with llama-perplexity's procedure
(tools/perplexity/perplexity.cpp, perplexity()): tokenize with the model's BOS convention, cut the tokens into
n_ctx chunks (tail dropped), clear the context per chunk, put BOS first in each chunk when the vocabulary adds
one, evaluate the chunk and score the logits at n_ctx/2 .. n_ctx-2 against the next tokens.

    python bench/perplexity_vs_llama_cpp.py [GGUF] [--text FILE] [--ctx 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "camelid" / "eval" / "texts" / "harbour.txt"


def llama_cpp_perplexity(gguf: str, text: str, n_ctx: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)) if hasattr(
        llama_cpp, "llama_vocab_get_add_bos") else llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    tokens = llm.tokenize(text.encode(), add_bos=bool(add_bos), special=False)
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(n_chunk):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)  # [n_ctx, V]
        rows = logits[first:n_ctx - 1]
        rows = rows - rows.max(axis=1, keepdims=True)
        logp = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        t = -logp[np.arange(len(rows)), chunk[first + 1:n_ctx]]
        nll += t.sum()
        nll2 += (t * t).sum()
        count += len(t)
    mean = nll / count
    ppl = math.exp(mean)
    return {"perplexity": ppl, "stderr": math.sqrt(max(nll2 / count - mean * mean, 0) / (count - 1)) * ppl,
            "tokens": len(tokens), "scored": count, "chunks": n_chunk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", default=None)
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from camelid.store import resolve

    gguf = str(resolve(args.gguf))
    text = Path(args.text).read_text(encoding="utf-8")
    rows = []
    for mode, flags in (("reference (float32)", ["--reference"]), ("auto (Q4_1 kept, bf16)", ["--quant", "auto"])):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "camelid", "perplexity", gguf, args.text, "--chunks", "--context",
                            str(args.ctx), "--threads", str(args.threads), "--json", *flags],
                           capture_output=True, text=True, check=True)
        rows.append((f"camelid {mode}", json.loads(r.stdout), time.perf_counter() - t0))
    t0 = time.perf_counter()
    rows.append(("llama.cpp (llama-cpp-python)", llama_cpp_perplexity(gguf, text, args.ctx, args.threads),
                 time.perf_counter() - t0))
    print(f"{Path(args.text).name}, n_ctx {args.ctx}, {Path(gguf).name}")
    print(f"{'implementation':32} {'PPL':>10} {'+/-':>9} {'tokens':>7} {'chunks':>6} {'scored':>6} {'time':>7}")
    for name, r, t in rows:
        print(f"{name:32} {r['perplexity']:10.4f} {r['stderr']:9.5f} {r['tokens']:7d} {r.get('chunks', r.get('windows')):6d} "
              f"{r['scored']:6d} {t:6.1f}s")


if __name__ == "__main__":
    main()
