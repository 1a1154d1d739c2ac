"""Memory-mapped experts: scoring 8 tokens with a Llama 4 GGUF holding ~430 MB of Q8_0 experts pages in only the
experts those tokens are routed to. Measured as this process's resident pages of the file's mapping
(/proc/self/smaps), so the page cache the writer left behind does not count. Linux only."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_factory import _add_vocab, byte_level_vocab, random_blocks

from camelid.eval.perplexity import perplexity
from camelid.formats import read
from camelid.loader import build_model

Q8 = gguf.GGMLQuantizationType.Q8_0
D, FF, X, LAYERS, HEADS, KV, HEAD = 512, 1024, 128, 2, 8, 2, 64


def write_moe_gguf(path: Path) -> int:
    """A random llama4 GGUF (every layer MoE, 128 experts top-1); the bytes its expert tensors take."""
    rng = np.random.default_rng(0)
    vocab = byte_level_vocab()
    w = gguf.GGUFWriter(str(path), "llama4")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_expert_count(X)
    w.add_expert_used_count(1)
    w.add_expert_feed_forward_length(FF)
    w.add_interleave_moe_layer_step(1)
    _add_vocab(w, vocab)
    f32 = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32(len(vocab.tokens), D))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.add_tensor("output.weight", f32(len(vocab.tokens), D))
    expert_bytes = 0
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(b + "attn_q.weight", f32(HEADS * HEAD, D))
        w.add_tensor(b + "attn_k.weight", f32(KV * HEAD, D))
        w.add_tensor(b + "attn_v.weight", f32(KV * HEAD, D))
        w.add_tensor(b + "attn_output.weight", f32(D, HEADS * HEAD))
        w.add_tensor(b + "ffn_gate_inp.weight", f32(X, D))
        for name in ("gate", "up", "down"):
            rows, cols = (D, FF) if name == "down" else (FF, D)
            blocks = random_blocks(Q8, (X * rows, cols), rng).reshape(X, rows, -1)
            w.add_tensor(b + f"ffn_{name}_exps.weight", blocks, raw_dtype=Q8)
            expert_bytes += blocks.nbytes
            shape = (rows, cols)
            w.add_tensor(b + f"ffn_{name}_shexp.weight", f32(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expert_bytes


def resident_bytes(path: Path) -> int:
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_scoring_8_tokens_pages_in_under_half_the_experts(tmp_path):
    path = tmp_path / "moe.gguf"
    expert_bytes = write_moe_gguf(path)
    assert expert_bytes > 400e6
    model = build_model(read(path), quant="auto")
    result = perplexity(model, [72, 101, 108, 108, 111, 44, 32, 108])
    assert np.isfinite(result.perplexity)
    built = [len(layer.feed_forward.experts.built) for layer in model.layers]
    assert all(1 <= n <= 8 for n in built)
    assert resident_bytes(path) < expert_bytes / 2, (resident_bytes(path), expert_bytes, built)
