"""Tiny random llama GGUF files for the tests, written with llama.cpp's own `gguf.GGUFWriter`.

Weights are made in Hugging Face layout (rotate-half Q/K rows, camelid's canonical names) and written
the way llama.cpp's convert_hf_to_gguf.py writes them: GGUF tensor names, Q/K rows permuted to the
interleaved order by the converter's `permute`, 2-D tensors in the requested type (quantized with
`gguf.quants.quantize`), norms in F32. `write_gguf` returns what a correct reader must load: the
float weights after the type's quantization round trip, in HF layout.

K-quants (Q2_K..Q6_K) have no quantizer in gguf-py, so their tensors are random valid blocks (random
bits with small finite f16 scales); the expected weights are gguf-py's dequantization of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# byte offsets of the f16 scale fields inside one block of each type that gets random blocks
_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q8_0: (0,)}
# the range the f16 scales are drawn from: Q6_K's super-scale multiplies int8 sub-scales and 6-bit values, so it
# is drawn a hundred times smaller, for weights of about 1/sqrt(dim) (a random model with huge weights is chaotic:
# bf16 rounding alone then moves its logits)
_F16_RANGE = {Q.Q6_K: (0.00002, 0.00006)}

GGUF_NAMES = {  # canonical -> GGUF ({i} = layer)
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
}


@dataclass
class Spec:
    """Shape and hyper-parameters of a tiny llama."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 128
    vocab_size: int = 0  # 0: the vocabulary's size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    context_length: int = 256
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class Vocab:
    """The tokenizer.ggml.* arrays of a GGUF file."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    add_bos: bool | None = None
    add_space_prefix: bool | None = None
    extra: dict = field(default_factory=dict)


# --- llama.cpp's converter, re-stated ---


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> GGUF interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_factors(head_dim: int, base: float, factor: float = 8.0, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, old_context_len: int = 8192) -> np.ndarray:
    """The `rope_freqs.weight` tensor convert_hf_to_gguf.py writes for rope_type llama3."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# --- vocabularies ---


def byte_level_vocab(specials: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> Vocab:
    """A minimal `gpt2` vocabulary: the 256 byte-level characters (no merges) and control tokens."""
    from camelid.tokenizer import byte_decoder

    tokens = sorted(byte_decoder(), key=lambda c: byte_decoder()[c]) + list(specials)
    types = [1] * 256 + [3] * len(specials)
    return Vocab("gpt2", tokens, types, merges=[], pre="default", bos=256, eos=256 + len(specials) - 1, add_bos=False)


def vocab_from_sentencepiece(sp, user_defined: tuple[str, ...] = ()) -> Vocab:
    """A `llama` vocabulary copied from a SentencePieceProcessor, with llama.cpp's token types."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        elif piece in user_defined:
            types.append(4)
        else:
            types.append(1)
    return Vocab("llama", tokens, types, scores=scores, bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id(),
                 add_bos=True, add_space_prefix=True)


def vocab_from_tokenizers(tok, specials: tuple[str, ...] = ()) -> Vocab:
    """A `gpt2` vocabulary copied from a trained `tokenizers` byte-level BPE (vocab and merges)."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "ids must be dense"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return Vocab("gpt2", tokens, types, merges=merges, pre="default", bos=None,
                 eos=vocab[specials[0]] if specials else None, add_bos=False)


# --- weights ---


def random_weights(spec: Spec, n_vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights in HF layout under camelid's canonical names."""
    rng = np.random.default_rng(seed)
    d, hd, v = spec.dim, spec.head_dim, spec.vocab_size or n_vocab

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or 1 / math.sqrt(shape[-1]))).astype(np.float32)

    out = {"tok_embeddings.weight": w(v, d, scale=1.0), "norm.weight": 1 + w(d, scale=0.1)}
    if not spec.tied:
        out["output.weight"] = w(v, d)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = 1 + w(d, scale=0.1)
        out[p + "ffn_norm.weight"] = 1 + w(d, scale=0.1)
        out[p + "attention.wq.weight"] = w(spec.n_heads * hd, d)
        out[p + "attention.wk.weight"] = w(spec.n_kv_heads * hd, d)
        out[p + "attention.wv.weight"] = w(spec.n_kv_heads * hd, d)
        out[p + "attention.wo.weight"] = w(d, spec.n_heads * hd)
        out[p + "feed_forward.w1.weight"] = w(spec.hidden_dim, d)
        out[p + "feed_forward.w2.weight"] = w(d, spec.hidden_dim)
        out[p + "feed_forward.w3.weight"] = w(spec.hidden_dim, d)
    return out


def random_blocks(qtype: Q, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random valid quantized rows [rows, bytes]: random bits, f16 scales drawn small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        lo, hi = _F16_RANGE.get(qtype, (0.001, 0.01))
        raw[:, off:off + 2] = (rng.uniform(lo, hi, size=(n_blocks, 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def gguf_name(canonical: str) -> str:
    parts = canonical.split(".")
    if parts[0] == "layers":
        key = ".".join(["layers", "{i}", *parts[2:]])
        return GGUF_NAMES[key].replace("{i}", parts[1])
    return GGUF_NAMES[canonical]


def encode_tensor(name: str, w: np.ndarray, qtype: Q, spec: Spec, rng: np.random.Generator,
                  random: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(data to store in GGUF order, expected float weights in HF layout) for one canonical tensor.

    random=True writes random valid blocks of qtype instead of quantizing w (same shape)."""
    heads = spec.n_heads if name.endswith("wq.weight") else spec.n_kv_heads if name.endswith("wk.weight") else None
    perm = (lambda a: permute(a, spec.n_heads, heads)) if heads else (lambda a: a)
    if w.ndim == 1 or qtype == Q.F32:
        return perm(w).astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        return perm(w).astype(np.float16), w.astype(np.float16).astype(np.float32)
    if random:  # the float weights follow from the random blocks
        raw = random_blocks(qtype, w.shape, rng)
        return perm(raw), gguf.quants.dequantize(raw, qtype).astype(np.float32)
    stored = gguf.quants.quantize(perm(w), qtype)
    # quantization works row by row, so it commutes with the row permutation
    return stored, gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)


def write_gguf(
    path: Path,
    spec: Spec,
    vocab: Vocab,
    qtype: Q = Q.F32,
    weights: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    chat_template: str | None = None,
    rope_freqs: np.ndarray | None = None,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    reshape: dict[str, tuple[int, int]] | None = None,
    random_qtypes: tuple[Q, ...] = K_QUANTS,
    qtypes: dict[str, Q] | None = None,
) -> dict[str, np.ndarray]:
    """Write a llama GGUF; return the float32 HF-layout weights a correct reader loads.

    qtype applies to 2-D tensors (qtypes: canonical name -> type for the ones that differ, as in llama.cpp's
    mixed Q4_K_M files); those of random_qtypes are random valid blocks instead of quantized
    weights (K-quants: gguf-py cannot quantize them). drop/reshape: canonical names to leave out or
    store with another shape (for bad-file tests).
    """
    rng = np.random.default_rng(seed + 1)
    weights = weights if weights is not None else random_weights(spec, len(vocab.tokens), seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.hidden_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_vocab_size(weights["tok_embeddings.weight"].shape[0])
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    _add_vocab(w, vocab)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    expected = {}
    for name, t in weights.items():
        if name in drop:
            continue
        if reshape and name in reshape:
            t = np.resize(t, reshape[name]).astype(np.float32)
        qt = (qtypes or {}).get(name, qtype) if t.ndim == 2 else Q.F32
        data, expected[name] = encode_tensor(name, t, qt, spec, rng, random=qt in random_qtypes)
        raw_dtype = None if data.dtype in (np.float32, np.float16) else qt
        w.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _add_vocab(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    for value, add in ((v.bos, w.add_bos_token_id), (v.eos, w.add_eos_token_id), (v.unk, w.add_unk_token_id)):
        if value is not None:
            add(value)
    if v.add_bos is not None:
        w.add_add_bos_token(v.add_bos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
