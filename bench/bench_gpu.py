"""Batch-1 decode speed and achieved memory bandwidth of Llama-sized models with random weights (the GPU figure).

    python bench/bench_gpu.py [--device cuda] [--presets llama-3.2-1b llama-3.1-8b] [--tokens 128] [--repeats 3]

Decode at batch 1 reads every weight once per token, so weight bytes x tokens/s is the bandwidth the decode
achieves; it is set against a device-to-device copy of 1 GiB measured in the same run (bytes read + written / s).
Weights are random bfloat16 (speed does not depend on their values). `--device cpu --presets tiny` runs the same
code on a small model anywhere (the test suite does, so the script stays correct on machines without a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from camelid.cache import KVCache  # noqa: E402
from camelid.config import ModelConfig  # noqa: E402
from camelid.model import Transformer  # noqa: E402
from camelid.presets import get  # noqa: E402

TINY = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=4096, hidden_dim=768, max_seq_len=1024)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved per second by a device-to-device copy (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for layer in model.layers:
            layer.attention_norm.weight.fill_(1)
            layer.ffn_norm.weight.fill_(1)
        model.norm.weight.fill_(1)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes decode reads per token: every linear weight (the output layer included) and one embedding row."""
    total = 0
    for name, t in model.state_dict().items():
        if name == "tok_embeddings.weight":
            total += t[0].numel() * t.element_size()
        elif name.endswith("weight"):
            total += t.numel() * t.element_size()
    if model.config.tie_embeddings:  # the output layer reads the shared table in full
        total += model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


@torch.inference_mode()
def decode_speed(model: Transformer, tokens: int, repeats: int) -> float:
    device = model.device
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        cache = KVCache.for_model(model, 1, tokens + 1)
        tok = torch.tensor([[1]], device=device)
        logits = model(tok, None, cache)
        sync(device)
        t = time.perf_counter()
        for i in range(tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(tok, torch.tensor([[i + 1]], device=device), cache)
        sync(device)
        times.append(time.perf_counter() - t)
    return tokens / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "copy_bandwidth_gb_s": copy_bandwidth(device) / 1e9, "models": {}}
    for name in args.presets:
        cfg = TINY if name == "tiny" else get(name).config
        model = random_model(cfg, device, torch.bfloat16)
        tok_s = decode_speed(model, args.tokens, args.repeats)
        nbytes = weight_bytes_per_token(model)
        achieved = nbytes * tok_s / 1e9
        result["models"][name] = {"decode_tok_s": tok_s, "weight_gb": nbytes / 1e9, "achieved_gb_s": achieved,
                                  "fraction_of_copy_bandwidth": achieved / result["copy_bandwidth_gb_s"]}
        print(f"{name}: {tok_s:.1f} tok/s, {achieved:.0f} GB/s of {result['copy_bandwidth_gb_s']:.0f} GB/s "
              f"({100 * achieved / result['copy_bandwidth_gb_s']:.0f}%)", file=sys.stderr)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
