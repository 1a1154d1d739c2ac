"""Presets against published figures: parameter counts (Hugging Face safetensors totals of the official
repos) and FFN sizes (their config.json `intermediate_size`); Meta params.json read by the Meta reader."""

from __future__ import annotations

import pytest

from camelid.errors import ModelNotFoundError
from camelid.formats.meta import config_from_params
from camelid.presets import PRESETS, describe, format_description, get

# name: (parameters as published, intermediate_size of the HF config)
PUBLISHED = {
    "llama-7b": (6_738_415_616, 11008),
    "llama-13b": (13_015_864_320, 13824),
    "llama-30b": (32_528_943_616, 17920),
    "llama-65b": (65_285_660_672, 22016),
    "llama-2-7b": (6_738_415_616, 11008),
    "llama-2-13b": (13_015_864_320, 13824),
    "llama-2-70b": (68_976_648_192, 28672),
    "llama-3-8b": (8_030_261_248, 14336),
    "llama-3-70b": (70_553_706_496, 28672),
    "llama-3.1-8b": (8_030_261_248, 14336),
    "llama-3.1-70b": (70_553_706_496, 28672),
    "llama-3.1-405b": (405_853_388_800, 53248),
    "llama-3.2-1b": (1_235_814_400, 8192),
    "llama-3.2-3b": (3_212_749_824, 8192),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_and_ffn_size(name):
    params, ffn = PUBLISHED[name]
    cfg = get(name).config
    assert cfg.param_count() == params
    assert cfg.hidden_dim == ffn


def test_every_official_size_has_a_preset_with_a_source():
    assert set(PUBLISHED) <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.source, name
    assert PRESETS["llama-3.1-8b-instruct"].config == PRESETS["llama-3.1-8b"].config
    assert PRESETS["llama-2-7b-chat"].config == PRESETS["llama-2-7b"].config


def test_family_details():
    assert get("llama-7b").config.max_seq_len == 2048 and get("llama-2-7b").config.max_seq_len == 4096
    assert get("llama-3-8b").config.rope_scaling is None and get("llama-3-8b").config.max_seq_len == 8192
    assert get("llama-3.1-8b").config.rope_scaling.factor == 8.0
    assert get("llama-3.2-1b").config.rope_scaling.factor == 32.0 and get("llama-3.2-1b").config.tie_embeddings
    assert get("llama-2-70b").config.n_kv_heads == 8 and get("llama-2-13b").config.n_kv_heads == 40


# Meta's params.json as shipped, read by the Meta reader, gives the preset's shape
META_PARAMS = {
    "llama-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}, 32000),
    "llama-2-70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                     "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 32000),
    "llama-3.1-8b": ({"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                      "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "vocab_size": 128256}, 0),
}


@pytest.mark.parametrize("name", sorted(META_PARAMS))
def test_meta_params_give_the_preset(name):
    params, tokenizer_vocab = META_PARAMS[name]
    assert config_from_params(params, tokenizer_vocab) == get(name).config


def test_describe():
    d = describe("llama-3.1-8b")
    assert d["params"] == 8_030_261_248
    assert d["memory_bytes"]["bf16"] == 2 * d["params"] == d["memory_bytes"]["fp16"]
    assert d["memory_bytes"]["fp32"] == 4 * d["params"]
    assert d["memory_bytes"]["int4"] < d["memory_bytes"]["int8"] < d["memory_bytes"]["bf16"]
    # 32 layers * 8 kv heads * 128 dims * (K and V) * 2 bytes = 128 KiB per token
    assert d["kv_cache_bytes_per_token_bf16"] == 131072
    assert d["config"]["rope_scaling"]["factor"] == 8.0 and "Llama 3.1" in d["source"]


def test_unknown_preset_is_one_clear_error():
    with pytest.raises(ModelNotFoundError, match="no preset named 'llama-4-8b'"):
        get("llama-4-8b")
    with pytest.raises(ModelNotFoundError):
        get("Llama-3.1-8B")  # exact names only


def test_format_description():
    text = format_description(describe("llama-3.2-1b"))
    assert "1.24 B (1,235,814,400)" in text
    assert "weights bf16" in text and "2.3 GiB" in text  # 1,235,814,400 * 2 bytes
    assert "llama3 scaling x32" in text


def test_meta_llama_3_2_params_give_the_preset_with_factor_32():
    # Llama 3.2 1B params.json as shipped: no RoPE factor in it, yet the model uses 32 (as its HF config says)
    params = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8, "n_layers": 16,
              "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    assert config_from_params(params, 0, tie_embeddings=True) == get("llama-3.2-1b").config
