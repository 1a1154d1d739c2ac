"""GGUF architecture `llama4`: metadata -> ModelConfig (the tensors are read by gguf.py's shared code).

Keys read (`llama4.` prefix), with the value used when the file lacks one:
- block_count, embedding_length, attention.head_count, attention.head_count_kv, attention.key_length,
  context_length, rope.freq_base, attention.layer_norm_rms_epsilon: as for `llama`.
- feed_forward_length: the dense layers' SwiGLU size; expert_feed_forward_length: each routed expert's and the
  shared expert's size; expert_count (0 or missing: a dense model, MobileLLM-R1), expert_used_count (1).
- interleave_moe_layer_step (1): MoE on layers step-1, 2*step-1, ... (llama.cpp's (i + 1) % step == 0).
- attention.sliding_window: 0 means a dense MobileLLM file: RoPE on every layer and full attention everywhere
  (as llama.cpp reads it). Otherwise it is the attention chunk size, 8192 when missing (llama.cpp always uses
  8192; camelid takes the file's value).
- attention.sliding_window_pattern (4): chunked layers are those with (i + 1) % pattern != 0, or a bool per layer.
- NoPE layers: every 4th layer (llama.cpp's n_no_rope_layer_step), unless camelid's own `llama4.no_rope_layers`
  (int per layer, 1 = the layer has RoPE, as in Hugging Face configs) says otherwise.
- attention.temperature_length (8192) and attention.temperature_scale (0.1): the NoPE layers' temperature
  floor_scale and attn_scale (scale 0 switches it off).
- QK norm: on unless the model has 128 experts (llama.cpp's rule: Maverick has none), unless camelid's own
  `llama4.attention.qk_norm` (bool) says otherwise.
- rope_freqs.weight: per-frequency divisors of RoPE's inverse frequencies, applied as given.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig

CHUNK_DEFAULT = 8192
PATTERN_DEFAULT = 4
NO_ROPE_STEP = 4
FLOOR_DEFAULT = 8192.0
SCALE_DEFAULT = 0.1


def read_config(reader, n_vocab: int) -> ModelConfig:
    from ..errors import FormatError
    from .gguf import _field, _require

    a = "llama4."
    n_layers = int(_require(reader, a + "block_count"))
    n_heads = int(_require(reader, a + "attention.head_count"))
    dim = int(_require(reader, a + "embedding_length"))
    head_dim = int(_field(reader, a + "attention.key_length", dim // n_heads))
    n_experts = int(_field(reader, a + "expert_count", 0) or 0)
    step = int(_field(reader, a + "interleave_moe_layer_step", 1) or 0)
    moe = tuple(i for i in range(n_layers) if (i + 1) % step == 0) if n_experts and step > 0 else ()
    window = _field(reader, a + "attention.sliding_window")
    if window is not None and int(window) == 0:  # dense MobileLLM: RoPE everywhere, full attention
        nope, chunked, chunk = (), (), 0
    else:
        chunk = int(window) if window else CHUNK_DEFAULT
        pattern = _field(reader, a + "attention.sliding_window_pattern", PATTERN_DEFAULT)
        if isinstance(pattern, list):
            if len(pattern) < n_layers:
                raise FormatError(f"{reader.path}: {a}attention.sliding_window_pattern has {len(pattern)} entries "
                                  f"for {n_layers} layers")
            chunked = tuple(i for i in range(n_layers) if pattern[i])
        else:
            pattern = int(pattern)
            chunked = tuple(i for i in range(n_layers) if pattern > 0 and (i + 1) % pattern != 0)
        rope_layers = _field(reader, a + "no_rope_layers")
        if rope_layers:
            nope = tuple(i for i in range(n_layers) if not rope_layers[i])
        else:
            nope = tuple(i for i in range(n_layers) if (i + 1) % NO_ROPE_STEP == 0)
    tensors = {t.name: t for t in reader.tensors}
    factors = ()
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(f) for f in np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1))
        if len(factors) != head_dim // 2:
            raise FormatError(f"{reader.path}: rope_freqs.weight has {len(factors)} factors for head size {head_dim}")
    qk_norm = _field(reader, a + "attention.qk_norm")
    scale = float(_field(reader, a + "attention.temperature_scale", SCALE_DEFAULT))
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, a + "attention.head_count_kv", n_heads)),
        vocab_size=int(_field(reader, a + "vocab_size", n_vocab)),
        hidden_dim=int(_field(reader, a + "feed_forward_length", 0) or 0),
        norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, a + "rope.freq_base", 500000.0)),
        max_seq_len=int(_field(reader, a + "context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
        head_dim_override=head_dim if head_dim != dim // n_heads else None,
        arch="llama4",
        moe_layers=moe,
        n_experts=n_experts if moe else 0,
        n_experts_used=int(_field(reader, a + "expert_used_count", 1) or 1),
        expert_hidden_dim=int(_require(reader, a + "expert_feed_forward_length")) if moe else 0,
        nope_layers=nope,
        chunked_layers=chunked,
        attention_chunk_size=chunk,
        qk_norm=bool(qk_norm) if qk_norm is not None else n_experts != 128,
        attn_temperature_tuning=bool(nope) and scale != 0,
        floor_scale=float(_field(reader, a + "attention.temperature_length", FLOOR_DEFAULT)),
        attn_scale=scale,
        rope_factors=factors,
    )


def moe_step(cfg: ModelConfig) -> int:
    """The interleave_moe_layer_step that gives cfg.moe_layers (0: dense); UnsupportedModelError when none does."""
    from ..errors import UnsupportedModelError

    if not cfg.moe_layers:
        return 0
    for step in range(1, cfg.n_layers + 1):
        if cfg.moe_layers == tuple(i for i in range(cfg.n_layers) if (i + 1) % step == 0):
            return step
    raise UnsupportedModelError(f"MoE layers {list(cfg.moe_layers)} are not every n-th layer, which a llama4 GGUF "
                                "cannot express (its interleave_moe_layer_step)")


def write_keys(w, cfg: ModelConfig) -> None:
    """The llama4-only metadata (read back by read_config above; the standard llama.cpp keys plus camelid's own
    `llama4.no_rope_layers` and `llama4.attention.qk_norm`, which llama.cpp ignores)."""
    from gguf import GGUFValueType as V

    step = moe_step(cfg)
    w.add_interleave_moe_layer_step(step)
    if cfg.moe_layers:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_used)
        w.add_expert_feed_forward_length(cfg.expert_hidden_dim)
    if not cfg.chunked_layers and not cfg.nope_layers:
        w.add_sliding_window(0)
    else:
        w.add_sliding_window(cfg.attention_chunk_size or CHUNK_DEFAULT)
        w.add_key_value("llama4.attention.sliding_window_pattern",
                        [i in cfg.chunked_layers for i in range(cfg.n_layers)], V.ARRAY, V.BOOL)
        w.add_key_value("llama4.no_rope_layers", [int(i not in cfg.nope_layers) for i in range(cfg.n_layers)],
                        V.ARRAY, V.INT32)
        w.add_attn_temperature_length(int(cfg.floor_scale))
        w.add_attn_temperature_scale(cfg.attn_scale if cfg.attn_temperature_tuning else 0.0)
    w.add_key_value("llama4.attention.qk_norm", bool(cfg.qk_norm), V.BOOL)
