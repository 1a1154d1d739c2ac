"""K-quant GGUFs at run time: KL against the float reference and decode speed, camelid next to llama.cpp on the
same files, both measured in this run on this machine.

    python bench/bench_kquant.py [--model PATH] [--types Q4_K_M Q5_K_M Q6_K] [--threads 2] [--tg 64] [--repeats 3]

The model (default: the store's default, SmolLM2-135M-Instruct Q4_1) is written as F16 by camelid
(camelid.formats.write, what `camelid quantize --to f16` does), then quantized by llama.cpp's own quantizer
(llama_cpp.llama_model_quantize) to each K-quant type. The float reference is camelid's float32 path on the F16
file (the only float weights here are the Q4_1 file's, so "float" means those values in float). On a text
(camelid's built-in paragraph), per position: KL(reference || x) of the next-token distributions, for x = camelid
(fast path; the prompt fed in chunks of 64 tokens so the products take the int4 kernel, as decode does) and
x = llama.cpp (logits_all), on the same K-quant file; and top-1 agreement with the reference. Decode: tokens/s
over --tg greedy tokens after a one-token prompt, median over --repeats, one process per engine (camelid.bench's
workers). Files whose rows are not whole 256-blocks (this model's dim is 576) get llama.cpp's fallback types
(Q5_0/Q5_1/Q8_0) for those tensors: the table lists each file's tensor types.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

CHUNK = 64  # camelid prompt chunk: under quant.DENSE_MIN_TOKENS, so the int4 kernel (decode's path) runs


def write_f16(source: Path, out: Path) -> Path:
    from camelid.formats import read, write

    write(read(source), out, "f16", overwrite=True)
    return out


def llama_quantize(llama_cpp, source: Path, out: Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's quantizer (llama-quantize) on `source`, to LLAMA_FTYPE_MOSTLY_<ftype>."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed ({rc})")
    return out


def llama_cpp_logits(path: Path, text: str, threads: int = 2) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's token ids for `text` and its logits at every position [T, V] (float32)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=2048, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return ids, logits


@torch.inference_mode()
def camelid_logits(path: Path, ids: list[int], quant: str | None = "auto") -> torch.Tensor:
    """camelid's logits at every position [T, V]: quant=None is the float32 reference (one forward), otherwise the
    fast path fed CHUNK tokens at a time through a KV cache."""
    from camelid.cache import KVCache
    from camelid.formats import read
    from camelid.loader import build_model

    model = build_model(read(path), quant=quant)
    tokens = torch.tensor([ids])
    if quant is None:
        return model(tokens)[0]
    cache = KVCache.for_model(model, 1, len(ids))
    out = [model(tokens[:, s : s + CHUNK], torch.arange(s, min(s + CHUNK, len(ids)))[None], cache)[0]
           for s in range(0, len(ids), CHUNK)]
    return torch.cat(out)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, nats."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def tensor_types(path: Path) -> str:
    from camelid.formats import read

    counts = Counter(t.dtype for name, t in read(path).tensors.items() if name.endswith("weight") and len(t.shape) == 2)
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def decode_tok_s(engine: str, path: Path, threads: int, tg: int, repeats: int) -> float:
    from camelid import bench

    pp = str(tg + 8)  # the llama.cpp worker keeps n_batch = pp rows of scores: more than the decoded tokens
    runs = [bench._run_worker(["worker", engine, str(path), str(threads), pp, str(tg), "1", "auto"]) for _ in range(repeats)]
    return statistics.median(r["decode_tok_s"] for r in runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the store's default model)")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q6_K"], help="llama.cpp file types")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg", type=int, default=64, help="decoded tokens per speed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the F16 and K-quant files go (default: a temporary folder)")
    args = ap.parse_args(argv)

    import llama_cpp

    from camelid import bench
    from camelid.eval.quality import DEFAULT_TEXT
    from camelid.store import resolve

    torch.set_num_threads(args.threads)
    source = Path(args.model) if args.model else Path(resolve(None))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="camelid-kquant-"))
    work.mkdir(parents=True, exist_ok=True)
    f16 = write_f16(source, work / "f16.gguf")
    ids, ref_llama = llama_cpp_logits(f16, DEFAULT_TEXT, args.threads)
    ref = camelid_logits(f16, ids, quant=None)
    m = bench.machine()
    print(f"# {source.name} -> F16 (camelid) -> K-quants (llama.cpp {llama_cpp.__version__}); {len(ids)} tokens of text; "
          f"CPU {m['cpu']}, {args.threads} threads, torch {m['torch']}; machine shared with other work (timings noisy)")
    print(f"# float check: KL(camelid f32 || llama.cpp on F16) mean {kl(ref, ref_llama).mean():.5f} nats")
    print("| file | tensor types | KL camelid | KL llama.cpp | top-1 camelid | top-1 llama.cpp | KL(llama.cpp || camelid) "
          "| decode camelid tok/s | decode llama.cpp tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ftype in args.types:
        path = llama_quantize(llama_cpp, f16, work / f"{ftype}.gguf", ftype, args.threads)
        _, theirs = llama_cpp_logits(path, DEFAULT_TEXT, args.threads)
        ours = camelid_logits(path, ids)
        top = ref.argmax(-1)
        ours_s = decode_tok_s("camelid", path, args.threads, args.tg, args.repeats)
        theirs_s = decode_tok_s("llama.cpp", path, args.threads, args.tg, args.repeats)
        print(f"| {ftype} | {tensor_types(path)} | {kl(ref, ours).mean():.5f} | {kl(ref, theirs).mean():.5f} | "
              f"{(ours.argmax(-1) == top).float().mean():.3f} | {(theirs.argmax(-1) == top).float().mean():.3f} | "
              f"{kl(theirs, ours).mean():.5f} | {ours_s:.1f} | {theirs_s:.1f} | {ours_s / theirs_s:.2f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
